"""Our output against msModelSlim 26.1.0's own output for the same tiny model (tests/data/golden).

The manifests were produced by scripts/golden/make_golden.sh: the reference's Calibrator alone, with its example
script's QuantConfig and disable names, saved in the MindIE layout (safe_tensor), the default layout (ascendV1), and
the default layout with part_file_size=1; and the example's full flow (AntiOutlier m2 or m4, then the Calibrator)
in the MindIE layout, which adds no tensor for either method. Values differ by design (see README); names, dtypes,
shapes, the byte order inside the file, the description json, config.json and the file modes must not.
"""

import json
import os
import stat

import pytest

from conftest import ROOT, quantize
from qwenvl_dq.checkpoint import read_header

GOLDEN = os.path.join(ROOT, "tests", "data", "golden")
FLAGS = {"mindie": ["--mindie_format"], "default": [], "default_parts": ["--part_file_size", "1"],
         "mindie_m2": ["--mindie_format", "--anti_method", "m2"],
         "mindie_m4": ["--mindie_format", "--anti_method", "m4"]}
OURS_ONLY = {"merges.txt"}  # the reference copies only *.json (and *.py); we copy every tokenizer file, no code


@pytest.fixture(scope="module")
def outputs(tiny_model, tiny_fp16, tmp_path_factory):
    base = tmp_path_factory.mktemp("golden")
    made = {}
    for dtype, model in (("bfloat16", tiny_model), ("float16", tiny_fp16)):
        for layout, flags in FLAGS.items():
            out = base / f"{dtype}_{layout}"
            assert quantize(model, out, "--calib_num", "1", *flags) == 0
            made[(dtype, layout)] = str(out)
    return made


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("layout", list(FLAGS))
def test_output_matches_msmodelslim_manifest(outputs, dtype, layout):
    gold = json.load(open(os.path.join(GOLDEN, f"{dtype}_{layout}.json")))
    out = outputs[(dtype, layout)]
    tensors = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            tensors.update({k: [v["dtype"], v["shape"]] for k, v in read_header(os.path.join(out, f))[0].items()})
    assert list(tensors.items()) == list(gold["tensors"].items())  # same names, dtypes, shapes, same file order
    assert len(tensors) == gold["num_tensors"]
    desc = json.load(open(os.path.join(out, gold["description_file"])))
    assert list(desc.items()) == list(gold["description"].items())
    assert json.load(open(os.path.join(out, "config.json"))) == gold["config"]
    ours = {f: oct(stat.S_IMODE(os.stat(os.path.join(out, f)).st_mode))[2:].zfill(4) for f in os.listdir(out)}
    assert {f: m for f, m in ours.items() if f not in OURS_ONLY} == dict(gold["files"])
    assert oct(stat.S_IMODE(os.stat(out).st_mode))[2:].zfill(4) == gold["dir_mode"].zfill(4)[-4:]
    for name, index in gold.get("index", {}).items():
        assert json.load(open(os.path.join(out, name))) == index
