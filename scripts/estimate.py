#!/usr/bin/env python3
"""A paper estimate for a large Qwen2-VL (default: 72B on 8 cards, 30 images, m2), from the dry-run plan and the
per-layer costs scripts/bench.py measured on the medium model.

    .venv/bin/python scripts/estimate.py out/bench.json [--config tests/data/configs/Qwen2-VL-72B-Instruct]
        [--ranks 8] [--card_tflops 100] [--disk_gbs 2]

How:
- per decoder layer of the medium model, from the 8- and 32-layer runs of bench.json: forward = the extra calibrate
  seconds of 24 more layers with --anti_method none (one sweep), search = the same with m2 minus its sweep (one
  since 2026-12-08: the smoothed groups' kept inputs give their ranges; a bench.json from before, with two m2
  sweeps, needs --sweeps 2);
- the target's forward work scales with its layer's weights and its tokens (the plan's 1024 per image); the search
  works on a fixed token reservoir (observers.RESERVOIR_TOKENS, full in both), so it scales with the weights only;
  vision blocks likewise, per weight, with the full attention of each image;
- those CPU seconds become card seconds at the ratio of this CPU's float32 matmul speed (measured here, now) to
  --card_tflops, the rate assumed for the card on these matmuls (a third of an Ascend 910B's or an A100's bf16 peak);
- every rank reads its own slice at the same time (the plan balances them) and quantizes and writes each of its
  layers as soon as it is solved (qwenvl_dq/output.py), at the rate merge.quantize_linear runs on this CPU with
  --threads threads (measured now; the bench's calibrate phase includes that work, so it is taken out of the
  per-layer forward) or the disk's --disk_gbs shared by all ranks, whichever is slower; after calibration rank 0
  reads and writes the token embeddings and the last rank the head.
Every input is printed beside the result: it is an estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from qwenvl_dq import plan, qwen2vl  # noqa: E402

GIB = 2**30


def layer_weights(arch: qwen2vl.Arch, prefix: str) -> int:
    """Elements of the linear weights of one decoder layer (prefix model.layers.0.) or vision block."""
    return sum(torch.Size(s).numel() for n, s in qwen2vl.checkpoint_shapes(arch).items()
               if n.startswith(prefix) and n.endswith(".weight") and len(s) == 2)


def output_bytes(arch: qwen2vl.Arch, el: int = 2) -> int:
    quantized = set(qwen2vl.quantized_linears(arch))
    total = 0
    for n, s in qwen2vl.checkpoint_shapes(arch).items():
        p, _, leaf = n.rpartition(".")
        numel = torch.Size(s).numel()
        total += numel if (p in quantized and leaf == "weight") else numel * el
        if p in quantized and leaf == "weight":
            total += s[0] * (2 * el + 4 + 4) + 2 * el  # weight scale/offset, quant_bias, deq_scale, input scale/offset
    return total


def seconds_per_call(fn, warm: int, n: int) -> float:
    """Mean seconds of fn() over n calls, after `warm` untimed ones."""
    for _ in range(warm):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def cpu_gflops(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 1024), torch.randn(1024, 2816)
    return 2 * 2048 * 1024 * 2816 / seconds_per_call(lambda: a @ b, warm=3, n=20) / 1e9


def quantize_mibs(threads: int) -> float:
    """MiB/s of bf16 source weight through merge.quantize_linear on this CPU (a 4096 x 4096 linear)."""
    from qwenvl_dq import allocator, merge

    allocator.pin_mmap_threshold()  # as a run sets it
    torch.set_num_threads(threads)
    w = torch.randn(4096, 4096).to(torch.bfloat16)
    scale, offset = torch.tensor([0.02]), torch.tensor([3.0])
    call = lambda: merge.quantize_linear(w, None, scale, offset, torch.bfloat16)  # noqa: E731
    return w.numel() * 2 / seconds_per_call(call, warm=1, n=5) / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", help="bench.json from scripts/bench.py (medium model, 8 and 32 layers)")
    p.add_argument("--config", default=os.path.join(ROOT, "tests", "data", "configs", "Qwen2-VL-72B-Instruct"))
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--images", type=int, default=30)
    p.add_argument("--card_gib", type=float, default=64.0, help="memory per card (default 64)")
    p.add_argument("--card_tflops", type=float, default=100.0,
                   help="sustained TFLOP/s assumed for a card on these matmuls (default 100)")
    p.add_argument("--disk_gbs", type=float, default=2.0, help="disk read/write GB/s assumed (default 2)")
    p.add_argument("--threads", type=int, default=2, help="threads of the bench's 1-rank runs (default 2)")
    p.add_argument("--cpu_gflops", type=float, default=None,
                   help="this CPU's float32 matmul GFLOP/s with --threads threads (default: measured now; pass it "
                        "when the machine is busy)")
    p.add_argument("--quantize_mibs", type=float, default=None,
                   help="MiB/s of source weight quantized per rank on the host CPU (default: measured now)")
    p.add_argument("--sweeps", type=int, default=1, choices=(1, 2),
                   help="forward sweeps of an m2 run in bench.json: 1 (default), 2 for a bench.json of a version "
                        "before 2026-12-08")
    a = p.parse_args()

    b = json.load(open(a.bench))
    runs = b["runs"]
    med = qwen2vl.Arch.from_dict(qwen2vl.read_config(b["models"]["8"]["path"]))
    big = qwen2vl.Arch.from_dict(qwen2vl.read_config(a.config))
    g_cpu = a.cpu_gflops or cpu_gflops(a.threads)
    q_rate = (a.quantize_mibs or quantize_mibs(a.threads)) * 2**20  # source bytes per second and rank
    _, layer_bytes_med, _ = plan.sizes(med, torch.bfloat16)
    write_med = layer_bytes_med[0] / q_rate  # s per layer of the medium model's calibrate phase spent writing it
    cal = {k: runs[f"ours {k}"]["seconds"]["calibrate"] for k in ("none 8L", "none 32L", "m2 8L", "m2 32L")}
    fwd_med = (cal["none 32L"] - cal["none 8L"]) / 24 - write_med  # s per layer, one sweep
    search_med = (cal["m2 32L"] - cal["m2 8L"]) / 24 - a.sweeps * fwd_med
    vis_med = cal["m2 8L"] - 8 * (a.sweeps * fwd_med + search_med + write_med)  # vision tower + fixed costs of m2
    tokens_med = b["floor"]["tokens"]
    w_med = layer_weights(med, "model.layers.0.")
    w_big = layer_weights(big, "model.layers.0.")
    v_med = layer_weights(med, "visual.blocks.0.") * med.vision_depth
    v_big = layer_weights(big, "visual.blocks.0.") * big.vision_depth
    tokens_big = a.images * plan.TOKENS
    patches = plan.TOKENS * big.vision_merge_size ** 2  # per image
    to_card = g_cpu / (a.card_tflops * 1e3)

    fwd_big = fwd_med * (w_big / w_med) * (tokens_big / tokens_med) * to_card
    search_big = search_med * (w_big / w_med) * to_card
    layer_big = fwd_big + search_big  # one sweep (the product now; --sweeps describes bench.json only)
    vis_flops = 2 * v_big * patches * a.images + 4 * patches**2 * big.vision_embed_dim * big.vision_depth \
        * a.images  # one sweep: linears + attention
    vis_big = vis_flops / (a.card_tflops * 1e12) + search_med * (v_big / w_med) * to_card
    layout = plan.make_plan(big, torch.bfloat16, a.ranks, int(a.card_gib * GIB), images=a.images, anti_method="m2")
    counts = [len(range(*r.layers)) for r in layout.ranks]
    compute = max(c * layer_big + (vis_big if r == 0 else 0) for r, c in enumerate(counts))
    src = layout.total_bytes
    out = output_bytes(big)
    read_slices = src / (a.disk_gbs * 1e9)  # the ranks' slices together, all at once from one disk
    slice_max = max(r.weights for r in layout.ranks)  # a rank's layers (rank 0: with the vision tower)
    # each rank quantizes its own slice (at once: one host CPU's cores shared), the disk takes every rank's output
    write = max(slice_max / q_rate, out / (a.disk_gbs * 1e9))
    tables = src - sum(r.weights for r in layout.ranks)  # embeddings, head, final norm: no rank's slice
    rest = 2 * tables / (a.disk_gbs * 1e9)  # read and written after calibration (rank 0, the last rank), one disk
    total = read_slices + compute + write + rest
    print(f"target: {a.config}: {big.num_layers} decoder layers, {big.vision_depth} vision blocks, "
          f"{src / GIB:.1f} GiB bf16;\n  {a.ranks} cards of {a.card_gib:.0f} GiB, {a.images} images x "
          f"{plan.TOKENS} tokens")
    print(f"measured (bench.json, medium model, {med.num_layers}/32 layers, {tokens_med} tokens): per decoder layer "
          f"forward {fwd_med:.2f} s per sweep, m2 search {search_med:.2f} s; vision + fixed {vis_med:.1f} s; "
          f"write {write_med:.2f} s (of the calibrate phase)")
    print(f"this CPU: {g_cpu:.0f} GFLOP/s float32, quantizes {q_rate / 2**20:.0f} MiB/s of bf16 weight "
          f"({a.threads} threads); card assumed {a.card_tflops:.0f} TFLOP/s, disk {a.disk_gbs:.1f} GB/s")
    print(f"scale: layer weights x{w_big / w_med:.0f}, tokens x{tokens_big / tokens_med:.1f}, "
          f"vision weights x{v_big / v_med:.0f}")
    print("per card: " + ", ".join(f"rank {r.rank} {counts[i]} layers peak {r.peak / GIB:.1f} GiB"
                                     for i, r in enumerate(layout.ranks[:2])) + ", ... (the --dry_run plan)")
    print(f"estimate: read slices {read_slices / 60:.1f} min + calibrate {compute / 60:.1f} min (per layer: forward "
          f"{fwd_big:.1f} s + search {search_big:.1f} s; rank 0's vision tower {vis_big:.0f} s) + "
          f"quantize and write the layers {write / 60:.1f} min (each rank its slice, at most "
          f"{slice_max / GIB:.0f} GiB; {out / GIB:.0f} GiB written in all) + embeddings and head "
          f"{rest / 60:.1f} min = {total / 60:.0f} min; I/O {100 * (read_slices + write + rest) / total:.0f}% of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
