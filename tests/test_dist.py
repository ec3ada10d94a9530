"""Several ranks, real processes over gloo: the same bytes as one rank, each rank reads only its own layers, a lost
rank stops everyone with its name, and the plan splits layers by their calibration work."""

import json
import os
import signal
import threading
import time

import pytest
import torch

from conftest import CALIB, ROOT, dir_hashes, many_images, one_rank, run_ranks, start_ranks
from qwenvl_dq import calib_data, calibrate, plan, qwen2vl
from qwenvl_dq.checkpoint import Checkpoint
from qwenvl_dq.errors import UserError

PROBE = os.path.join(ROOT, "tests", "rank_probe.py")


def seed_flags(model, out, *extra):
    return ["--model_path", model, "--save_directory", str(out), "--calib_images", CALIB, "--device_type", "cpu",
            "--calib_num", "3", "--mindie_format", *extra]


def probes(results):
    out = {}
    for rc, stdout, stderr in results:
        assert rc == 0, stderr
        line = [x for x in stdout.splitlines() if x.startswith("PROBE ")][0]
        p = json.loads(line[len("PROBE "):])
        out[p["rank"]] = p
    return out


@pytest.mark.parametrize("method", ["none", "m2", "m4"])
def test_outputs_are_byte_identical_for_1_2_and_3_ranks(five_layers, tmp_path, method):
    hashes = {}
    for n, extra in ((1, []), (2, []), (3, ["--max_memory", "1e-6"])):  # 3 ranks: every rank streams its layers
        out = tmp_path / f"r{n}"
        results = run_ranks(n, seed_flags(five_layers, out, "--anti_method", method))
        for rank, (rc, _, stderr) in enumerate(results):
            assert rc == 0, (n, rank, stderr)
        assert "holds its slice, pipelined" in results[0][2] if n == 2 else True
        hashes[n] = dir_hashes(out)
    assert len(hashes[1]) >= 10 and "quant_model_weight_w8a8.safetensors" in hashes[1]
    assert hashes[2] == hashes[1]
    assert hashes[3] == hashes[1]


@pytest.mark.parametrize("method", ["none", "m4"])
def test_resident_and_layer_major_give_the_same_results(tiny_model, method):
    samples = calib_data.load_samples(CALIB, tiny_model, limit=2)
    arch = qwen2vl.Arch.from_dict(qwen2vl.read_config(tiny_model))
    got = []
    for resident in (False, True):
        model = qwen2vl.build_skeleton(qwen2vl.load_hf_config(tiny_model, False), torch.bfloat16)
        stage = one_rank(model, Checkpoint(tiny_model), arch, "histogram", method, resident)
        got.append(calibrate.calibrate(stage, samples, len(samples)))
    assert len(got[0]) > 40 and sorted(got[0]) == sorted(got[1])
    for k in got[0]:
        assert torch.equal(got[0][k], got[1][k]), k


def test_each_rank_reads_only_its_own_layers_once_and_writes_them(five_layers, tmp_path):
    ranks = probes(run_ranks(3, seed_flags(five_layers, tmp_path / "o", "--anti_method", "m2"), script=PROBE))
    ckpt = Checkpoint(five_layers)
    arch = qwen2vl.Arch.from_dict(qwen2vl.read_config(five_layers))
    samples = calib_data.load_samples(CALIB, five_layers, limit=3)
    tokens = round(sum(s.input_ids.shape[-1] for s in samples) / 3)
    layout = plan.make_plan(arch, torch.bfloat16, 3, images=3, tokens=tokens)  # balanced for these images
    for r, p in ranks.items():
        a, b = layout.ranks[r].layers
        assert tuple(p["layers"]) == (a, b), r
        mine = {n for n in ckpt.names() if any(n.startswith(f"model.layers.{i}.") for i in range(a, b))}
        if r == 0:
            mine |= {n for n in ckpt.names() if n.startswith("visual.")} | {"model.embed_tokens.weight"}
        read = p["read"]
        assert set(read) == mine, r
        # every tensor once; the embedding table by rows, once per sample (3 samples, one sweep for m2 too)
        rows = [n for n in read if n == "model.embed_tokens.weight"]
        assert len(rows) == (3 if r == 0 else 0), r
        assert len(read) - len(rows) == len(set(read) - {"model.embed_tokens.weight"}), r
    assert [layout.ranks[r].layers for r in range(3)] == [(0, 1), (1, 3), (3, 5)]
    # the whole run reads the source once: each rank writes its layers from memory as they are solved; rank 0 reads
    # the embedding table whole (calibration read only rows of it) and the last rank the final norm and the head
    nbytes = {n: ckpt.nbytes(n) for n in ckpt.names()}
    head = {n for n in ckpt.names() if n.startswith(qwen2vl.HEAD_PREFIXES)}
    assert head and ranks[1]["bytes_read"] == sum(nbytes[n] for n in set(ranks[1]["read"]))
    assert ranks[2]["bytes_read"] == sum(nbytes[n] for n in set(ranks[2]["read"]) | head)
    rows = ranks[0]["bytes_read"] - sum(nbytes[n] for n in set(ranks[0]["read"]))
    assert 0 < rows < nbytes["model.embed_tokens.weight"]
    assert sum(p["bytes_read"] for p in ranks.values()) == sum(nbytes.values()) + rows
    # and every rank writes its own share; rank 0's figure is every rank's
    data = 0
    for f in os.listdir(tmp_path / "o"):
        if f.endswith(".safetensors"):
            with open(tmp_path / "o" / f, "rb") as fh:
                data += os.path.getsize(fh.name) - 8 - int.from_bytes(fh.read(8), "little")
    assert ranks[1]["bytes_written"] > 0 and ranks[2]["bytes_written"] > 0
    assert ranks[0]["bytes_written"] == data > ranks[1]["bytes_written"] + ranks[2]["bytes_written"]


def test_a_save_directory_the_other_ranks_do_not_see_is_written_by_rank_0(five_layers, tmp_path):
    ref = tmp_path / "one"
    assert run_ranks(1, seed_flags(five_layers, ref, "--anti_method", "m2"))[0][0] == 0
    out = tmp_path / "o"
    results = run_ranks(3, ["--probe_unshared", *seed_flags(five_layers, out, "--anti_method", "m2")], script=PROBE)
    ranks = probes(results)
    assert f"save_directory {out} is not the same directory on every rank" in results[0][2]
    assert ranks[1]["bytes_written"] == ranks[2]["bytes_written"] == 0
    assert dir_hashes(out) == dir_hashes(ref)
    # rank 0 reads the other ranks' layers again once their results have come, the head too: every tensor once,
    # beside the embedding rows of calibration; the others only their layers
    ckpt = Checkpoint(five_layers)
    rows = ranks[0]["bytes_read"] - sum(ckpt.nbytes(n) for n in ckpt.names())
    assert 0 < rows < ckpt.nbytes("model.embed_tokens.weight")
    assert ranks[2]["bytes_read"] == sum(ckpt.nbytes(n) for n in set(ranks[2]["read"]))


def test_a_killed_rank_stops_every_other_rank_with_its_name(five_layers, tmp_path):
    calib = many_images(tmp_path / "calib", 12)  # enough samples that rank 1 dies mid-calibration
    out = tmp_path / "o"
    argv = seed_flags(five_layers, out, "--anti_method", "m2", "--dist_timeout", "30")
    argv[argv.index("--calib_images") + 1] = calib
    argv[argv.index("--calib_num") + 1] = "48"
    procs = start_ranks(3, argv)
    lines = []  # rank 0's log, read as it comes
    reader = threading.Thread(target=lambda: lines.extend(procs[0].stderr), daemon=True)
    reader.start()
    t0 = time.monotonic()
    while not any("sample 5/48" in x for x in lines) and time.monotonic() - t0 < 120:
        time.sleep(0.02)
    assert procs[1].poll() is None, procs[1].communicate()
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    for r in (0, 2):
        procs[r].wait(timeout=60)
        reader.join(timeout=10) if r == 0 else None
        err = "".join(lines) if r == 0 else procs[r].stderr.read()
        assert procs[r].returncode == 3, (r, err)
        assert time.monotonic() - killed < 30, r
        assert "lost rank 1" in err, (r, err)
        assert "Traceback" not in err
    procs[1].communicate()
    names = os.listdir(out)
    assert "INCOMPLETE" in names
    assert not [n for n in names if n.startswith("quant_model_description")]


def test_partition_balances_the_load_with_the_vision_tower_on_rank_0():
    assert plan.partition(0, (1,) * 6, 3) == ((0, 2), (2, 4), (4, 6))
    assert plan.partition(3, (1,) * 9, 3) == ((0, 1), (1, 5), (5, 9))  # loads 3 + 1, 4, 4
    assert plan.partition(100, (1,) * 4, 4) == ((0, 1), (1, 2), (2, 3), (3, 4))  # every rank keeps one layer
    with pytest.raises(UserError, match="5 ranks but the model has only 4 decoder layers"):
        plan.partition(0, (1,) * 4, 5)


def test_costs_count_a_layers_operations_and_the_vision_towers_patches():
    arch = qwen2vl.Arch.from_dict(qwen2vl.read_config(os.path.join(ROOT, "tests", "data", "configs",
                                                                   "Qwen2-VL-72B-Instruct")))
    linears = 2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 29568 * 8192  # q, o; k, v; gate, up, down
    vision, layers = plan.costs(arch, images=1, tokens=1024, smoothing=False)
    assert len(layers) == 80 and set(layers) == {2 * 1024 * linears + 4 * 1024 * 1024 * 8192}
    block = 3 * 1280 * 1280 + 1280 * 1280 + 2 * 1280 * 5120  # qkv, proj, fc1, fc2
    merger = 5120 * 5120 + 8192 * 5120
    embed = 1280 * 3 * 2 * 14 * 14
    want = 32 * (2 * 4096 * block + 4 * 4096 * 4096 * 1280) + 2 * 1024 * merger + 2 * 4096 * embed
    assert vision == want
    # by bytes the tower is 0.80 of a layer, by work 4.40 (none) and 3.79 (m2: one sweep and the search)
    vb, lb, _ = plan.sizes(arch, torch.bfloat16)
    assert round(vb / lb[0], 2) == 0.80 and round(vision / layers[0], 2) == 4.40
    vision, layers = plan.costs(arch, images=30, tokens=1024, smoothing=True)
    assert round(vision / layers[0], 2) == 3.79
    assert plan.partition(vision, layers, 8)[:2] == ((0, 3), (3, 14))  # loads 3 + 3.79, 11 layers
    # the same images, fewer tokens: attention shrinks faster than the linears
    vision, layers = plan.costs(arch, images=30, tokens=256, smoothing=False)
    assert round(vision / layers[0], 2) == 3.32


def test_the_peaks_follow_the_longest_image_when_it_exceeds_the_estimates_tokens():
    arch = qwen2vl.Arch.from_dict(qwen2vl.read_config(os.path.join(ROOT, "tests", "data", "configs",
                                                                   "Qwen2-VL-72B-Instruct")))
    budget = 64 * plan.GIB
    base = plan.make_plan(arch, torch.bfloat16, 8, budget)
    assert plan.make_plan(arch, torch.bfloat16, 8, budget, longest=300) == base  # shorter images: still 1024
    long = plan.make_plan(arch, torch.bfloat16, 8, budget, longest=4096)
    assert [r.layers for r in long.ranks] == [r.layers for r in base.ranks]  # balanced for the mean, as before
    # rank 1 (11 layers, resident, m2): two in-flight samples grow by 3072 tokens of bf16 hidden states, one
    # sample's float32 intermediates (4096 tokens) now exceed quantizing the largest linear, and each layer keeps
    # 3072 more tokens of its two smoothed groups' inputs (q/k/v, gate/up: 8192 channels each) for all 30 images
    work = 4096 * (29568 * 3 + 8192 * 4) * 4
    quant = 29568 * 8192 * 3
    kept = 11 * 30 * 3072 * 2 * 8192 * 2
    assert long.ranks[1].peak - base.ranks[1].peak == 2 * 3072 * 8192 * 2 + work - quant + kept
    assert "30 images x 4096 tokens (peaks; the layers balanced for 1024 tokens per image)" in plan.report(
        long, arch, torch.bfloat16)


def test_dry_run_plans_72b_on_8_cards_from_its_config_alone(tmp_path, capsys):
    from conftest import quantize

    model = os.path.join(ROOT, "tests", "data", "configs", "Qwen2-VL-72B-Instruct")
    assert quantize(model, tmp_path / "o", "--dry_run", "--ranks", "8", "--max_memory", "64", "--anti_method",
                    "m2", "--device_type", "npu") == 0
    out = capsys.readouterr().out
    assert "32 vision blocks, 80 decoder layers, 136.73 GiB of weights (bfloat16)" in out
    assert ("rank 0: decoder layers 0..2 (3 layers + vision tower): 6.21 GiB of weights, holds its slice, "
            "pipelined, estimated peak 29.04 GiB") in out
    assert "rank 7: decoder layers 69..79 (11 layers): 17.98 GiB of weights" in out
    assert "(no weights in model_path: sizes from config.json)" in out
    assert not os.path.exists(tmp_path / "o")
    # on cpu the layers are held and run in float32 (a CPU without bf16 units emulates bf16): twice the bytes
    assert quantize(model, tmp_path / "o", "--dry_run", "--ranks", "8", "--max_memory", "64", "--anti_method",
                    "m2") == 0
    assert ("rank 0: decoder layers 0..2 (3 layers + vision tower): 6.21 GiB of weights, holds its slice, "
            "pipelined, estimated peak 56.84 GiB") in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--ranks", "4"], "ranks: 4: --ranks N (N >= 1) plans for N ranks and goes with --dry_run"),
    (["--dist_timeout", "0"], "dist_timeout: 0.0 must be a positive number of seconds"),
    (["--max_memory", "-1"], "max_memory: -1.0 must be a positive number of GiB"),
])
def test_bad_distributed_flags_are_refused(tiny_model, tmp_path, capsys, flags, message):
    from conftest import quantize

    assert quantize(tiny_model, tmp_path / "o", *flags) == 2
    assert message in capsys.readouterr().err
