"""Peak memory follows one layer, not the model: 4x the decoder layers must not take 4x the memory."""

import json
import os
import subprocess
import sys

import pytest

import make_tiny_qwen2vl
from conftest import CALIB, ROOT, run_ranks

SIZES = ["--hidden_size", "512", "--intermediate_size", "2048", "--num_attention_heads", "8",
         "--num_key_value_heads", "4", "--vision_embed_dim", "64", "--vision_num_heads", "4"]
# the process's whole-life peak: qwenvl-dq resets the kernel's high-water mark between phases, after which
# ru_maxrss counts from the reset only
PROBE = ("import sys; from qwenvl_dq import allocator; from qwenvl_dq.cli import main; rc = main(sys.argv[1:]); "
         "print('PEAK_RSS', allocator.lifetime_peak()); sys.exit(rc)")


def peak_rss(model, out):
    r = subprocess.run([sys.executable, "-c", PROBE, "quantize", "--model_path", model, "--save_directory", out,
                        "--calib_images", CALIB, "--calib_num", "2", "--device_type", "cpu", "--anti_method", "none",
                        "--mindie_format", "--part_file_size", "0.05"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split("PEAK_RSS")[1].split()[0])


def model_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("depth")
    return (make_tiny_qwen2vl.build(str(base / "l8"), SIZES + ["--num_hidden_layers", "8"]),
            make_tiny_qwen2vl.build(str(base / "l32"), SIZES + ["--num_hidden_layers", "32"]))


def test_peak_rss_grows_far_less_than_the_weights(models, tmp_path):
    small, big = models
    rss_small = peak_rss(small, str(tmp_path / "o8"))
    rss_big = peak_rss(big, str(tmp_path / "o32"))
    grown = model_bytes(big) - model_bytes(small)
    print(f"\npeak RSS: 8 layers {rss_small / 2**20:.0f} MiB, 32 layers {rss_big / 2**20:.0f} MiB "
          f"(ratio {rss_big / rss_small:.2f}); weights grew by {grown / 2**20:.0f} MiB")
    assert grown > 150 * 2**20
    # a whole-model load would grow RSS by at least the weights; ours grows by a small fraction of them
    assert rss_big - rss_small < 0.2 * grown, (rss_small, rss_big, grown)
    assert rss_big / rss_small < 1.25


def merge_peak(model, out):
    """Rank 0's peak RSS during the merge and write of a 2-rank run."""
    results = run_ranks(2, ["--model_path", model, "--save_directory", out, "--calib_images", CALIB, "--calib_num",
                            "2", "--device_type", "cpu", "--anti_method", "none", "--mindie_format",
                            "--part_file_size", "0.05"], script=os.path.join(ROOT, "tests", "rank_probe.py"))
    for rc, _, err in results:
        assert rc == 0, err
    probe = json.loads(results[0][1].split("PROBE ")[1])
    assert probe["rank"] == 0
    return probe["peak_rss"]["write"]


def test_rank_0_merge_memory_does_not_grow_with_the_layers(models, tmp_path):
    small, big = models
    peak_small = merge_peak(small, str(tmp_path / "o8"))
    peak_big = merge_peak(big, str(tmp_path / "o32"))
    grown = model_bytes(big) - model_bytes(small)
    print(f"\nrank 0 merge peak: 8 layers {peak_small / 2**20:.0f} MiB, 32 layers {peak_big / 2**20:.0f} MiB")
    assert 100 * 2**20 < peak_small
    assert peak_big - peak_small < 0.1 * grown, (peak_small, peak_big, grown)
    assert peak_big / peak_small < 1.1
