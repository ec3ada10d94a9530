"""Command line: the reference script's flags with its defaults (msModelSlim's quant_qwen2vl.py), plus ours.

    qwenvl-dq quantize --model_path M --save_directory OUT [--calib_images DIR] [--mindie_format] ...
    qwenvl-dq evaluate --model_path M --quantized OUT [OUT ...] --images HELDOUT [--report r.json]
    qwenvl-dq inspect OUT
    python -m qwenvl_dq quantize ...
    python scripts/quant_qwen2vl.py ...        (the same flags, no subcommand)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
from typing import NoReturn

from .config import ACT_METHODS, ANTI_METHODS, DEFAULT_PROMPT, DEVICE_TYPES, LOG_LEVELS, OUTPUT_FORMATS, Config
from .errors import RankLost, Stopped, UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line like every other user error: `error: part_file_size: 0 must be ...`."""

    def error(self, message: str):
        message = re.sub(r"^argument --(\w+)(/-\w+)?: ", r"\1: ", message)
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def str2bool(v: str) -> bool:
    if isinstance(v, bool):
        return v
    low = v.strip().lower()
    if low in ("true", "1", "yes", "y", "on"):
        return True
    if low in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{v!r} is not True or False")


def positive_gb(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a number of GB") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"{v} must be a positive number of GB (or leave it out for one file)")
    return x


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    seed = p.add_argument_group("the reference script's flags (same names, meanings and defaults)")
    seed.add_argument("--model_path", required=True,
                      help="the float Qwen2-VL weight directory (config.json + safetensors); required")
    seed.add_argument("--calib_images", default="../calibImages",
                      help="folder of calibration images, used in name order; the bundled examples come from COCO: "
                           "extend them to 30 images for accuracy, or use images of your own use case "
                           "(default: %(default)s)")
    seed.add_argument("--save_directory", required=True, help="where the quantized weights are written; required")
    seed.add_argument("--part_file_size", type=positive_gb, default=None,
                      help="max size of one quantized weight file in GB (2^30 bytes; fractions allowed) "
                           "(default: None, no limit: one weight file)")
    seed.add_argument("--w_bit", type=int, default=8,
                      help="weight quantization bits; Qwen2-VL supports 8 (default: %(default)s)")
    seed.add_argument("--a_bit", type=int, default=8,
                      help="activation quantization bits; Qwen2-VL supports 8 (default: %(default)s)")
    seed.add_argument("--device_type", default="npu", choices=DEVICE_TYPES,
                      help="device type calibration runs on; npu and cuda run one rank per visible card "
                           "(default: %(default)s)")
    seed.add_argument("--trust_remote_code", type=str2bool, nargs="?", const=True, default=False,
                      help="trust custom code in the model directory (True/False); make sure it comes from a "
                           "reliable source (default: %(default)s)")
    seed.add_argument("--anti_method", default="m2", choices=ANTI_METHODS,
                      help="outlier suppression: m2 (Outlier Suppression Plus, optimised for multimodal "
                           "understanding models), m4 (Iterative Smooth), none (default: %(default)s)")
    seed.add_argument("--mindie_format", action="store_true",
                      help="make the saved weights' description json and config.json compatible with current "
                           "MindIE versions (default: off)")
    ours = p.add_argument_group("qwenvl-dq options")
    ours.add_argument("--calib_num", type=int, default=None,
                      help="use only the first N images, sorted by name (default: all)")
    add_prompt_args(ours)
    ours.add_argument("--act_method", default="histogram", choices=list(ACT_METHODS),
                      help="static activation range: histogram (the reference's act_method=2) or minmax "
                           "(default: %(default)s)")
    ours.add_argument("--act_symmetric", action="store_true",
                      help="symmetric static activations (zero point 0, scale max(|min|, |max|) / 127), as "
                           "vllm-ascend requires; default: asymmetric (the reference's)")
    ours.add_argument("--output_format", default="mindie", choices=OUTPUT_FORMATS,
                      help="mindie: msModelSlim's layout, what MindIE reads (--mindie_format adds MindIE's "
                           "description json and config.json); compressed-tensors: what vLLM reads "
                           "(default: %(default)s)")
    ours.add_argument("--dry_run", action="store_true",
                      help="print which rank holds which layers and each rank's estimated peak memory; "
                           "reads config.json (and safetensors headers if present), loads no weights (default: off)")
    ours.add_argument("--ranks", type=int, default=None,
                      help="with --dry_run: plan for N ranks (default: the launcher's WORLD_SIZE, else 1)")
    ours.add_argument("--max_memory", type=float, default=None, metavar="GIB",
                      help="memory per rank in GiB (2^30 bytes); a rank whose slice of layers does not fit loads "
                           "one layer at a time instead (default: the card's free memory; on cpu the host's "
                           "available memory divided by the ranks on the host)")
    ours.add_argument("--dist_timeout", type=float, default=1800.0, metavar="SECONDS",
                      help="how long a rank waits for another before the run stops with an error naming it "
                           "(default: %(default)s)")
    ours.add_argument("--overwrite", action="store_true",
                      help="replace an earlier output (complete or not) in save_directory; a directory holding "
                           "anything else is never deleted (default: off)")
    ours.add_argument("--resume", action="store_true",
                      help="continue a run that stopped (crash, Ctrl-C, lost rank, full disk): layers it solved are "
                           "taken from save_directory/.qwenvl_dq/ and the output is byte-identical to an "
                           "uninterrupted run; refused if the model, images or flags differ (default: off)")
    add_log_level(ours)
    ours.add_argument("--evaluate_images", default=None, metavar="DIR",
                      help="held-out images (not the calibration ones): once the output is written, run it next to "
                           "the float model on them and add the quality figures to the summary, as qwenvl-dq "
                           "evaluate does (default: off)")
    ours.add_argument("--quiet", action="store_true",
                      help="no progress bars and no progress log lines, only warnings, errors and the final "
                           "summary (default: off; bars show only on a terminal)")


def add_prompt_args(p) -> None:
    """How each image becomes a model input (quantize and evaluate alike)."""
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="text that follows each image in the prompt (default: %(default)r)")
    p.add_argument("--min_pixels", type=int, default=None,
                   help="smallest image area in pixels after resizing (default: qwen_vl_utils' 3136)")
    p.add_argument("--max_pixels", type=int, default=None,
                   help="largest image area in pixels after resizing (default: qwen_vl_utils' 12845056)")


def add_log_level(p) -> None:
    p.add_argument("--log_level", default="info", choices=LOG_LEVELS,
                   help="logging verbosity; debug also shows tracebacks (default: %(default)s)")


def user_error(e, log_level: str, code: int = 2) -> int:
    """Print an error as one line (with the traceback being handled, at debug level); returns the exit code."""
    if log_level == "debug":
        logging.exception("failed")
    print(f"error: {e}", file=sys.stderr)
    return code


@contextlib.contextmanager
def stop_signals():
    """SIGTERM and SIGHUP (torchrun's agent, a batch scheduler, a closed terminal) raise Stopped in the main thread,
    so they unwind like Ctrl-C: temporary files removed, the other ranks told, the journal kept."""
    def stop(signum, _frame):
        raise Stopped(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def config_from_args(a: argparse.Namespace) -> Config:
    return Config(**{f: getattr(a, f) for f in Config.__dataclass_fields__})


def setup_logging(level: str, quiet: bool = False) -> None:
    """Log lines carry the rank; progress (info) shows on rank 0 only, other ranks show warnings and errors
    unless --log_level debug; --quiet keeps warnings and errors only."""
    rank = os.environ.get("RANK", "0")
    if (rank != "0" or quiet) and level == "info":
        level = "warning"
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_quantize(a: argparse.Namespace, entry: list[str], argv: list[str]) -> int:
    """entry + argv: how this process was started (the command a multi-card relaunch repeats)."""
    from . import dist, job

    cfg = config_from_args(a)
    setup_logging(cfg.log_level, cfg.quiet)
    cmd = None if cfg.dry_run else dist.launch_command(cfg.device_type, entry, argv)
    if cmd is not None:
        logging.info("%s cards visible: starting one rank per card: %s (to use one card, make only it visible, "
                     "e.g. ASCEND_RT_VISIBLE_DEVICES=0)", cmd[cmd.index("--nproc_per_node") + 1], " ".join(cmd))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(cmd[0], cmd)
    resume = "run the same command with --resume to continue from the layers already solved"
    try:
        with stop_signals():
            summary = job.quantize(cfg)
    except UserError as e:
        return user_error(e, cfg.log_level)
    except RankLost as e:
        return user_error(f"{e}; the output directory is left marked INCOMPLETE: {resume}", cfg.log_level, code=3)
    except KeyboardInterrupt as e:
        name = e.signal_name if isinstance(e, Stopped) else "SIGINT"
        if cfg.log_level == "debug":
            logging.exception("stopped")
        print(f"stopped by {name}: the output directory, if it was started, is marked INCOMPLETE and holds no "
              f"description json; {resume}", file=sys.stderr)
        return 128 + getattr(signal, name)
    if summary is None or not summary.files:
        return 0  # a dry run, or a rank other than 0
    report = None
    if cfg.evaluate_images is not None:
        from . import evaluate

        logging.info("evaluating %s on %s", cfg.save_directory, cfg.evaluate_images)
        try:
            report = evaluate.evaluate(cfg.model_path, [("quantized", cfg.save_directory)], cfg.evaluate_images,
                                       prompt=cfg.prompt, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                       device=dist.device_for(cfg.device_type),
                                       trust_remote_code=cfg.trust_remote_code, role="evaluate_images")
        except UserError as e:
            return user_error(f"the output is complete, but evaluating it failed: {e}", cfg.log_level)
        from .writer import write_json

        write_json(os.path.join(cfg.save_directory, "quality_report.json"), report, indent=2)
    print(summary_text(summary, report))
    return 0


def summary_text(summary, report: dict | None = None) -> str:
    """The final summary of a quantize run: the output's files and sizes, the compression, the time by phase,
    every rank's peak memory, what was read, and the quality figures when the run evaluated its output."""
    lines = [f"wrote {summary.save_directory} in {summary.seconds['total']:.1f} s: "
             f"{summary.bytes_written / 2**20:.2f} MiB of weights from {summary.source_bytes / 2**20:.2f} MiB "
             f"of source tensors ({summary.source_bytes / max(summary.bytes_written, 1):.2f}x smaller)"]
    for f in summary.files:
        size = os.path.getsize(os.path.join(summary.save_directory, f))
        lines.append(f"  {f}  {size:,} bytes")
    lines.append("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in summary.seconds.items()))
    for rank, peaks in [(0, summary.peak_rss)] + [(r, o["peak_rss"]) for r, o in sorted(summary.ranks.items())]:
        if peaks:  # the phases' windows cover the rank's whole life: its peak is the largest
            lines.append(f"peak memory (rank {rank}): {max(peaks.values()) / 2**20:.0f} MiB ("
                         + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in peaks.items()) + ")")
    read = summary.bytes_read + sum(o["bytes_read"] for o in summary.ranks.values())
    lines.append(f"read {read / 2**20:.1f} MiB from the source, all ranks together "
                 f"({read / max(summary.source_bytes, 1):.2f}x its {summary.source_bytes / 2**20:.1f} MiB of tensors: "
                 f"each rank reads its layers once and writes them as they are solved)")
    if report is not None:
        from . import evaluate

        run = report["runs"]["quantized"]
        lines.append(f"quality on {len(report['samples'])} held-out images ({report['tokens']} tokens): logits "
                     f"cosine {run['logits_cosine']:.5f}, top-1 agreement {100 * run['top1_agreement']:.1f}%, "
                     f"mean SQNR LLM {evaluate._db(run['mean_sqnr_db']['llm'])} dB, vision "
                     f"{evaluate._db(run['mean_sqnr_db']['vision'])} dB "
                     f"(report: {os.path.join(summary.save_directory, 'quality_report.json')})")
    return "\n".join(lines)


def run_inspect(a: argparse.Namespace) -> int:
    from . import inspection

    try:
        report = inspection.inspect(a.output)
    except UserError as e:
        return user_error(e, "info")
    print(inspection.text(report))
    return 0 if report.complete else 1


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="the float Qwen2-VL the outputs were quantized from; required")
    p.add_argument("--quantized", required=True, nargs="+", metavar="DIR",
                   help="one or more quantized output directories (qwenvl-dq's or msModelSlim's); required")
    p.add_argument("--labels", nargs="+", default=None,
                   help="a name per --quantized directory for the table and plot (default: the directory names)")
    p.add_argument("--images", required=True,
                   help="held-out images (not the calibration ones) to evaluate on; required")
    p.add_argument("--num_images", type=int, default=None,
                   help="use only the first N images, sorted by name (default: all)")
    add_prompt_args(p)
    p.add_argument("--report", default="quality_report.json", help="JSON report path (default: %(default)s)")
    p.add_argument("--plot", default=None, help="PNG of SQNR by layer (default: the report path with .png)")
    p.add_argument("--device_type", default="cpu", choices=DEVICE_TYPES,
                   help="device to run both models on (default: %(default)s)")
    p.add_argument("--trust_remote_code", type=str2bool, nargs="?", const=True, default=False,
                   help="allow code from the model directory to run (default: %(default)s)")
    add_log_level(p)


def run_evaluate(a: argparse.Namespace) -> int:
    from . import dist, evaluate

    setup_logging(a.log_level)
    try:
        labels = a.labels or [os.path.basename(os.path.normpath(d)) for d in a.quantized]
        if len(labels) != len(a.quantized) or len(set(labels)) != len(labels):
            raise UserError(f"labels: {labels} must be one distinct name per --quantized directory "
                            f"({len(a.quantized)} given)")
        if a.num_images is not None and a.num_images < 1:
            raise UserError(f"num_images: {a.num_images} must be at least 1")
        device = dist.device_for(a.device_type)
        report = evaluate.evaluate(a.model_path, list(zip(labels, a.quantized)), a.images, limit=a.num_images,
                                   prompt=a.prompt, min_pixels=a.min_pixels, max_pixels=a.max_pixels,
                                   device=device, trust_remote_code=a.trust_remote_code)
    except UserError as e:
        return user_error(e, a.log_level)
    evaluate.write_report(report, a.report)
    png = a.plot or os.path.splitext(a.report)[0] + ".png"
    evaluate.plot(report, png)
    print(f"{len(report['samples'])} images, {report['tokens']} tokens: {', '.join(report['samples'])}")
    print(evaluate.table(report))
    print(f"report: {a.report}\nplot: {png}")
    return 0


def seed_parser(prog: str = "quant_qwen2vl.py") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="Quantize a Qwen2-VL model to W8A8 static int8 "
                                "(msModelSlim layout), layer by layer.")
    add_quantize_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="qwenvl-dq", description="Qwen2-VL W8A8 quantization.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a Qwen2-VL checkpoint to W8A8")
    add_quantize_args(q)
    e = sub.add_parser("evaluate", help="compare quantized outputs with their float model on held-out images")
    add_evaluate_args(e)
    i = sub.add_parser("inspect", help="print what a quantized output holds and check that it is complete "
                                       "(exit 0 complete, 1 not)")
    i.add_argument("output", help="a save_directory written by qwenvl-dq or msModelSlim")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if a.command == "quantize":
        return run_quantize(a, ["-m", "qwenvl_dq"], argv)
    if a.command == "inspect":
        return run_inspect(a)
    return run_evaluate(a)


def seed_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_quantize(seed_parser().parse_args(argv), [os.path.abspath(sys.argv[0])], argv)


def exit_process(code: int) -> NoReturn:
    """End the process with `code` once its output is flushed, without the interpreter's teardown: unloading
    torch's and transformers' thousands of modules and objects takes about a second of every run and every rank
    (measured: 1.0 s after importing torch and transformers' Qwen2-VL modules, 0.1 s with this). Only the
    command-line entry points call it, after main returned: the run's files are closed and synced by then, and
    an exception still unwinds and exits the usual way."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def entry() -> NoReturn:
    """The `qwenvl-dq` command and `python -m qwenvl_dq`."""
    exit_process(main())


def seed_entry() -> NoReturn:
    """scripts/quant_qwen2vl.py, the reference's command line."""
    exit_process(seed_main())
