"""What a user of the command line sees: --help explains every flag with its default, progress bars on a terminal
only (and never with --quiet), the final summary (with quality figures when asked), and `qwenvl-dq inspect`."""

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios

import pytest

from conftest import CALIB, ROOT, quantize

from qwenvl_dq import cli, qwen2vl

HELDOUT = os.path.join(ROOT, "tests", "data", "heldout")


def _subparsers():
    p = cli.Parser(prog="qwenvl-dq")
    sub = p.add_subparsers(dest="command")
    q = sub.add_parser("quantize")
    cli.add_quantize_args(q)
    e = sub.add_parser("evaluate")
    cli.add_evaluate_args(e)
    return {"quantize": q, "evaluate": e, "seed": cli.seed_parser()}


@pytest.mark.parametrize("which", ["quantize", "evaluate", "seed"])
def test_every_flag_has_help_with_its_default(which):
    p = _subparsers()[which]
    flags = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= (20 if which != "evaluate" else 10)
    for a in flags:
        assert a.help, a.option_strings
        assert a.required or "default" in a.help, f"{a.option_strings[0]}: {a.help!r} does not state its default"
        if a.required:
            assert "required" in a.help, a.option_strings


def test_seed_flags_keep_the_seed_defaults():
    a = cli.seed_parser().parse_args(["--model_path", "m", "--save_directory", "o"])
    assert (a.calib_images, a.part_file_size, a.w_bit, a.a_bit, a.device_type, a.trust_remote_code, a.anti_method,
            a.mindie_format) == ("../calibImages", None, 8, 8, "npu", False, "m2", False)


def _run_on_tty(argv, columns=120):
    """Run argv with stdout and stderr on a pseudo-terminal; returns (exit code, everything it printed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
            os.execv(sys.executable, [sys.executable, *argv])
        finally:
            os._exit(127)
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def _argv(model, out, *extra):
    return ["-m", "qwenvl_dq", "quantize", "--model_path", model, "--save_directory", str(out), "--calib_images",
            CALIB, "--device_type", "cpu", "--anti_method", "none", "--calib_num", "1", *extra]


BAR = re.compile(r"(calibrate|solve|write) *: +100%\|")


def test_progress_bars_on_a_terminal(tiny_model, tmp_path):
    code, text = _run_on_tty(_argv(tiny_model, tmp_path / "o"))
    assert code == 0, text
    for what in ("solve", "write"):  # one rank goes layer by layer: no per-sample bar
        assert re.search(rf"{what} *: +100%\|", text), (what, text[-3000:])
    assert re.search(r"solve +: +100%\|[^\n]*\| 5/5 ", text)  # 2 vision blocks + 3 decoder layers on one rank
    assert "calibrate:" not in text
    assert "wrote " in text and "x smaller" in text
    assert "solved model.layers.2" not in text  # the bars replace the per-layer log lines
    code, text = _run_on_tty(_argv(tiny_model, tmp_path / "z", "--anti_method", "none"), columns=0)
    assert code == 0 and re.search(r"write +: +100%\|", text)  # a terminal that reports no width: 100 columns


def test_quiet_and_non_terminal_runs_draw_no_bars(tiny_model, tmp_path):
    code, text = _run_on_tty(_argv(tiny_model, tmp_path / "q", "--quiet"))
    assert code == 0, text
    assert not BAR.search(text) and "%|" not in text
    assert " INFO " not in text
    assert "wrote " in text and "peak memory (rank 0)" in text  # the summary stays
    r = subprocess.run([sys.executable, *_argv(tiny_model, tmp_path / "p")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "%|" not in r.stdout + r.stderr
    assert "solved model.layers.2" in r.stderr  # the log lines are the progress instead


def test_summary_with_quality_figures(tiny_model, tmp_path, capsys):
    out = tmp_path / "o"
    assert quantize(tiny_model, out, "--evaluate_images", HELDOUT, "--calib_num", "2") == 0
    text = capsys.readouterr().out
    m = re.search(r"quality on (\d+) held-out images \((\d+) tokens\): logits cosine ([0-9.]+), "
                  r"top-1 agreement ([0-9.]+)%", text)
    assert m, text
    report = json.loads((out / "quality_report.json").read_text())
    assert int(m.group(1)) == len(report["samples"]) == len([f for f in os.listdir(HELDOUT) if f.endswith(".jpg")]) == 4
    assert float(m.group(3)) == pytest.approx(report["runs"]["quantized"]["logits_cosine"], abs=1e-5)
    assert 0.9 < float(m.group(3)) <= 1.0
    assert re.search(r"MiB of weights from [0-9.]+ MiB of source tensors \([0-9.]+x smaller\)", text)
    m = re.search(r"read ([0-9.]+) MiB from the source, all ranks together \(([0-9.]+)x its ([0-9.]+) MiB", text)
    assert m and float(m.group(1)) == pytest.approx(float(m.group(2)) * float(m.group(3)), abs=0.06)  # .1f MiB
    assert 1.0 <= float(m.group(2)) < 1.1  # once, and the embedding rows calibration needs
    assert (out / "quant_model_description.json").exists() and not (out / "INCOMPLETE").exists()


def test_evaluate_images_checked_before_any_work(tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert quantize(tiny_model, tmp_path / "o", "--evaluate_images", str(empty)) == 2
    assert f"evaluate_images: {empty} holds no image files" in capsys.readouterr().err
    assert quantize(tiny_model, tmp_path / "o", "--evaluate_images", CALIB) == 2
    assert "evaluate_images: " in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_evaluate_names_its_own_images_flag(tiny_model, output, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["evaluate", "--model_path", tiny_model, "--quantized", str(output), "--images", str(empty),
                     "--report", str(tmp_path / "r.json")]) == 2
    assert f"error: images: {empty} holds no image files" in capsys.readouterr().err


@pytest.fixture(scope="module")
def output(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "o"
    assert quantize(tiny_model, out, "--calib_num", "1", "--part_file_size", "0.0002") == 0
    return out


def test_inspect_a_complete_output(tiny_model, output, capsys):
    assert cli.main(["inspect", str(output)]) == 0
    text = capsys.readouterr().out
    arch = qwen2vl.Arch.from_dict(qwen2vl.read_config(tiny_model))
    n = len(qwen2vl.quantized_linears(arch))
    assert text.splitlines()[0] == f"{output}: mindie output, complete"
    assert f"W8A8 linears: {n} " in text
    assert f"  model.layers.*.self_attn.q_proj  x{arch.num_layers}" in text
    assert f"  visual.blocks.*.attn.qkv  x{arch.vision_depth}" in text
    assert re.search(r"  input_scale: [0-9.e-]+ / [0-9.e-]+ / [0-9.e-]+", text)
    parts = [f for f in os.listdir(output) if f.endswith(".safetensors")]
    assert len(parts) > 1 and f"files ({len(os.listdir(output))}, " in text
    assert "problems:" not in text


def test_inspect_finds_what_is_wrong(output, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(output, bad)
    (bad / "INCOMPLETE").write_text("")
    assert cli.main(["inspect", str(bad)]) == 1
    text = capsys.readouterr().out
    assert "NOT complete" in text and "--resume" in text
    # the command's process ends without the interpreter's teardown (cli.exit_process): its code and its whole
    # output, buffered in a pipe, still come out
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    r = subprocess.run([sys.executable, "-m", "qwenvl_dq", "inspect", str(bad)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 1 and r.stdout == text, (r.returncode, r.stdout, r.stderr)

    (bad / "INCOMPLETE").unlink()
    desc = json.loads((bad / "quant_model_description.json").read_text())
    del desc["model.layers.0.self_attn.q_proj.deq_scale"]
    (bad / "quant_model_description.json").write_text(json.dumps(desc))
    assert cli.main(["inspect", str(bad)]) == 1
    assert ("1 tensors are not in quant_model_description.json, e.g. model.layers.0.self_attn.q_proj.deq_scale"
            in capsys.readouterr().out)

    part = sorted(f for f in os.listdir(bad) if f.endswith(".safetensors"))[-1]
    os.chmod(bad / part, 0o600)
    with open(bad / part, "r+b") as f:
        f.truncate(100)
    assert cli.main(["inspect", str(bad)]) == 1
    assert part in capsys.readouterr().out

    assert cli.main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
