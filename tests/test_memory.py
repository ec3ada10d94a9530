"""Peak memory follows one layer, not the model: 4x the decoder layers must not take 4x the memory."""

import os
import subprocess
import sys

import make_tiny_qwen2vl
from conftest import CALIB, ROOT

SIZES = ["--hidden_size", "512", "--intermediate_size", "2048", "--num_attention_heads", "8",
         "--num_key_value_heads", "4", "--vision_embed_dim", "64", "--vision_num_heads", "4"]
PROBE = ("import resource, sys; from qwenvl_dq.cli import main; rc = main(sys.argv[1:]); "
         "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def peak_rss_kb(model, out):
    r = subprocess.run([sys.executable, "-c", PROBE, "quantize", "--model_path", model, "--save_directory", out,
                        "--calib_images", CALIB, "--calib_num", "2", "--device_type", "cpu", "--anti_method", "none",
                        "--mindie_format", "--part_file_size", "0.05"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split("MAXRSS_KB")[1].split()[0])


def model_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def test_peak_rss_grows_far_less_than_the_weights(tmp_path):
    small = make_tiny_qwen2vl.build(str(tmp_path / "l8"), SIZES + ["--num_hidden_layers", "8"])
    big = make_tiny_qwen2vl.build(str(tmp_path / "l32"), SIZES + ["--num_hidden_layers", "32"])
    rss_small = peak_rss_kb(small, str(tmp_path / "o8")) * 1024
    rss_big = peak_rss_kb(big, str(tmp_path / "o32")) * 1024
    grown = model_bytes(big) - model_bytes(small)
    print(f"\npeak RSS: 8 layers {rss_small / 2**20:.0f} MiB, 32 layers {rss_big / 2**20:.0f} MiB "
          f"(ratio {rss_big / rss_small:.2f}); weights grew by {grown / 2**20:.0f} MiB")
    assert grown > 150 * 2**20
    # a whole-model load would grow RSS by at least the weights; ours grows by a small fraction of them
    assert rss_big - rss_small < 0.2 * grown, (rss_small, rss_big, grown)
    assert rss_big / rss_small < 1.25
