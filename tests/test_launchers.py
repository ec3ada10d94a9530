"""The launchers in launcher/ start real ranks (torchrun, accelerate) and give the bytes one process gives; a run
started by hand on a multi-card host relaunches itself with one rank per card."""

import os
import subprocess
import sys

import pytest

from conftest import CALIB, ROOT, dir_hashes, quantize
from qwenvl_dq import dist


@pytest.fixture(scope="module")
def one_rank_output(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("launch") / "single"
    assert quantize(tiny_model, out, "--calib_num", "2", "--anti_method", "m2") == 0
    return dir_hashes(out)


def launch(script, tiny_model, out, env_extra=None, *flags):
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "PYTHON": sys.executable, "PATH": bindir + os.pathsep + os.environ["PATH"],
           "OMP_NUM_THREADS": "1", **(env_extra or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ASCEND_RT_VISIBLE_DEVICES",
                "CUDA_VISIBLE_DEVICES"):
        env.pop(var, None)
    env.update(env_extra or {})
    cmd = [os.path.join(ROOT, "launcher", script), *flags, "--device_type", "cpu", "--model_path", tiny_model,
           "--save_directory", str(out), "--calib_images", CALIB, "--calib_num", "2", "--anti_method", "m2"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", ["torchrun.sh", "accelerate.sh"])
def test_launcher_starts_two_ranks_with_the_same_output(script, tiny_model, tmp_path, one_rank_output):
    r = launch(script, tiny_model, tmp_path / "o", None, "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "from 2 ranks" in r.stderr  # rank 0's log: the results of both ranks were merged
    assert dir_hashes(tmp_path / "o") == one_rank_output


def test_launcher_without_a_rank_count_says_how_to_give_one(tiny_model, tmp_path):
    r = launch("torchrun.sh", tiny_model, tmp_path / "o")
    assert r.returncode == 2
    assert "set ASCEND_RT_VISIBLE_DEVICES (npu) or CUDA_VISIBLE_DEVICES (cuda)" in r.stderr and "--nproc N" in r.stderr
    r = launch("torchrun.sh", tiny_model, tmp_path / "o", None, "--nproc", "0")
    assert r.returncode == 2 and "--nproc 0 is not a positive number of ranks" in r.stderr
    assert not os.path.exists(tmp_path / "o")


def test_a_hand_started_run_on_a_multi_card_host_relaunches_one_rank_per_card():
    env = {"ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"}
    cmd = dist.launch_command("npu", ["/x/quant_qwen2vl.py"], ["--model_path", "M"], env)
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                   "/x/quant_qwen2vl.py", "--model_path", "M"]
    assert dist.launch_command("cuda", ["-m", "qwenvl_dq"], ["quantize"], {"CUDA_VISIBLE_DEVICES": "2,5"})[5] == "2"
    assert dist.launch_command("npu", [], [], {**env, "WORLD_SIZE": "4"}) is None  # already a rank
    assert dist.launch_command("npu", [], [], {"ASCEND_RT_VISIBLE_DEVICES": "3"}) is None  # one card
    assert dist.launch_command("cpu", [], [], env) is None
