"""One quantization run: plan -> calibrate -> solve -> merge -> write, with the output directory kept honest.

The output directory is complete only when its description json exists and INCOMPLETE is gone: the json is written
last, then the marker and the journal are removed. Until then INCOMPLETE says what is going on, parts live under
temporary names, and every solved layer is in the journal (.qwenvl_dq/), which --resume picks up.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Callable

import torch

from . import (allocator, calib_data, calibrate, dist, export_ct, export_mindie, journal, merge, outdir, output, plan,
               progress, qwen2vl)
from .checkpoint import Checkpoint
from .config import ACT_METHODS, Config
from .errors import UserError
from .writer import PartLayout, write_json

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclasses.dataclass
class Summary:
    save_directory: str
    files: list[str]
    bytes_written: int
    source_bytes: int
    seconds: dict[str, float]
    rank: int = 0
    tensors_read: list[str] = dataclasses.field(default_factory=list)  # during calibration
    bytes_read: int = 0  # in all
    peak_rss: dict[str, int] = dataclasses.field(default_factory=dict)  # phase -> peak resident bytes
    ranks: dict[int, dict] = dataclasses.field(default_factory=dict)  # rank 0 only: other ranks' peak_rss, bytes_read
    layers: tuple[int, int] = (0, 0)  # [start, stop) of the decoder layers this rank calibrated


def model_dtype(src_cfg: dict, ckpt: Checkpoint | None) -> torch.dtype:
    """The model's float dtype: config's torch_dtype (or dtype), else the embedding's (else bfloat16)."""
    name = src_cfg.get("torch_dtype") or src_cfg.get("dtype") or src_cfg.get("text_config", {}).get("torch_dtype")
    if name in _DTYPES or ckpt is None:
        return _DTYPES.get(name, torch.bfloat16)
    return ckpt.dtype("model.embed_tokens.weight")


def check_checkpoint(ckpt: Checkpoint, arch: qwen2vl.Arch) -> None:
    """Every tensor the config implies is present, with the shape it implies."""
    for name, shape in qwen2vl.checkpoint_shapes(arch).items():
        if name not in ckpt:
            raise UserError(f"model_path: tensor {name} is missing from {ckpt.model_path}; "
                            "the weights do not match config.json (or a shard is missing from the index)")
        if ckpt.shape(name) != shape:
            raise UserError(f"model_path: tensor {name} has shape {list(ckpt.shape(name))} but config.json implies "
                            f"{list(shape)}; the weights and config.json are from different models")


@dataclasses.dataclass
class OutputFormat:
    """--output_format's weight files: their layout (every rank computes the same), the MindIE layout's specs that
    merge.produce makes them from, how each produced tensor maps into the written layout, and the index's name."""

    layout: PartLayout
    specs: list
    convert: Callable | None
    index: str
    version: str | None = None  # compressed-tensors': the package version that validated the config


def output_format(cfg: Config, ckpt: Checkpoint, arch: qwen2vl.Arch, dtype: torch.dtype) -> OutputFormat:
    specs = merge.output_specs(ckpt, arch, dtype)
    if cfg.output_format != "compressed-tensors":
        return OutputFormat(PartLayout(export_mindie.WEIGHT_BASE, specs, cfg.part_bytes), specs, None,
                            export_mindie.WEIGHT_BASE + ".safetensors.index.json")
    version = export_ct.validate(export_ct.quantization_config(arch, cfg.act_symmetric))  # before any weight
    quantized = set(qwen2vl.quantized_linears(arch))
    layout = PartLayout(export_ct.WEIGHT_BASE, export_ct.tensor_specs(specs, quantized, dtype, cfg.act_symmetric),
                        cfg.part_bytes, export_ct.SAFETENSORS_METADATA, hf_names=True)
    return OutputFormat(layout, specs, functools.partial(export_ct.convert, quantized=quantized, model_dtype=dtype,
                                                         act_symmetric=cfg.act_symmetric),
                        export_ct.INDEX, version)


def finish_output(cfg: Config, fmt: OutputFormat, written: set[str], src_cfg: dict, arch: qwen2vl.Arch) -> list[str]:
    """Rank 0, once every rank's tensors are written and synced: the parts renamed whole, the index when they are
    numbered, the copied files, config.json and (MindIE) the description json, the completion marker
    (compressed-tensors: config.json) last; then the INCOMPLETE marker and the journal go."""
    out = cfg.save_directory
    parts = fmt.layout.commit(out, written)
    for p in parts:
        os.chmod(os.path.join(out, p), export_mindie.WEIGHT_MODE)
    files = list(parts)
    if fmt.layout.numbered:
        write_json(os.path.join(out, fmt.index), {"metadata": {"total_size": fmt.layout.nbytes},
                                                  "weight_map": fmt.layout.weight_map()},
                   export_mindie.JSON_MODE, indent=2)
        files.append(fmt.index)
    if cfg.output_format == "compressed-tensors":
        files += export_mindie.copy_side_files(cfg.model_path, out)
        export_mindie.write_config(out, export_ct.config_json(src_cfg, arch, cfg.act_symmetric, fmt.version))
        files.append("config.json")
    else:
        export_mindie.write_config(out, export_mindie.config_json(
            src_cfg, cfg.mindie_format, ACT_METHODS[cfg.act_method], cfg.anti_method, cfg.device_type))
        files.append("config.json")
        files += export_mindie.copy_side_files(cfg.model_path, out)
        desc = export_mindie.description_name(cfg.mindie_format)
        write_json(os.path.join(out, desc), export_mindie.description_json(merge.description(fmt.specs, arch),
                                                                             cfg.mindie_format),
                   export_mindie.JSON_MODE, indent=2)
        files.append(desc)
    outdir.finish(out)
    return files


def output_bytes(cfg: Config, ckpt: Checkpoint, arch: qwen2vl.Arch, dtype: torch.dtype) -> int:
    """What the output will take on disk: its tensors and copied files, plus room for the part headers and the
    index and description json (1 MiB and 0.1%)."""
    tensors = sum(s.nbytes for s in merge.output_specs(ckpt, arch, dtype))
    side = sum(os.path.getsize(os.path.join(cfg.model_path, f)) for f in export_mindie.side_files(cfg.model_path))
    return tensors + side + (1 << 20) + tensors // 1000


def _start_output(cfg: Config, ckpt: Checkpoint, arch: qwen2vl.Arch, dtype: torch.dtype) -> tuple[list, str]:
    """Rank 0, before any heavy work: the calibration samples, the space check, the journal's fingerprint (checked
    against the stopped run's when resuming), and the output directory made ready and marked INCOMPLETE.
    Returns (samples, fingerprint digest)."""
    out = cfg.save_directory
    got = outdir.check(out, cfg.model_path, cfg.overwrite, cfg.resume)
    keep = cfg.resume and got.kind == "incomplete"
    outdir.check_space(out, output_bytes(cfg, ckpt, arch, dtype), outdir.reclaimable(out, got, keep))
    samples = calib_data.load_samples(cfg.calib_images, cfg.model_path, limit=cfg.calib_num, prompt=cfg.prompt,
                                      min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                      trust_remote_code=cfg.trust_remote_code)
    for s in samples:  # the vision tower reads pixels in the model dtype: keep them so (half the memory of float32)
        s.pixel_values = s.pixel_values.to(dtype)
    fp = journal.fingerprint(cfg, ckpt.files, [s.path for s in samples])
    if keep:
        journal.check_fingerprint(out, fp)
    elif cfg.resume:
        log.info("resume: %s holds no unfinished run; starting from the beginning", out)
    outdir.prepare(out, got, keep_state=keep)
    with outdir.disk_errors(out, "writing the journal"):
        journal.write_fingerprint(out, fp)
    return samples, journal.digest(fp)


def _model(cfg: Config, weights: bool = True):
    """(source config.json, Arch, checked Checkpoint, dtype) of model_path. weights=False (the dry run) accepts a
    folder that holds only config.json: the Checkpoint is then None."""
    src_cfg = qwen2vl.read_config(cfg.model_path)
    arch = qwen2vl.Arch.from_dict(src_cfg)
    ckpt = None
    if weights or any(f.endswith((".safetensors", ".safetensors.index.json")) for f in os.listdir(cfg.model_path)):
        ckpt = Checkpoint(cfg.model_path)
        check_checkpoint(ckpt, arch)
    return src_cfg, arch, ckpt, model_dtype(src_cfg, ckpt)


def _plan(cfg: Config, arch: qwen2vl.Arch, dtype: torch.dtype, world: int, budget: int | None,
          images: int | None = None, tokens: int = plan.TOKENS, longest: int = plan.TOKENS) -> plan.Plan:
    """images, tokens (mean), longest: the calibration set's (rank 0 reads it); before that, the --calib_num or 30
    images of plan.TOKENS tokens the estimate assumes."""
    return plan.make_plan(arch, dtype, world, budget, images=images or cfg.calib_num or 30,
                          anti_method=cfg.anti_method, compute=calibrate.compute_dtype(cfg.device_type, dtype),
                          tokens=tokens, longest=longest)


def _dry_run(cfg: Config, world: int) -> None:
    _, arch, ckpt, dtype = _model(cfg, weights=False)
    layout = _plan(cfg, arch, dtype, world, cfg.max_memory_bytes)
    if dist.env_world()[0] == 0:
        note = "" if ckpt else "\n(no weights in model_path: sizes from config.json)"
        print(plan.report(layout, arch, dtype) + note)


def quantize(cfg: Config) -> Summary | None:
    """Run this rank's part of the job; returns None for --dry_run. Rank 0's summary describes the output."""
    t0 = time.perf_counter()
    allocator.pin_mmap_threshold()
    rank, world, _ = dist.env_world()
    cfg.validate(main=rank == 0)
    if cfg.dry_run:
        _dry_run(cfg, cfg.ranks or world)
        return None
    source = _model(cfg)  # a bad checkpoint, or more ranks than layers, stops every rank before they join
    _plan(cfg, source[1], source[3], world, None)
    d = dist.setup(cfg.device_type, cfg.dist_timeout)
    bars = progress.Progress.for_rank(d.is_main, cfg.quiet)
    try:
        with bars.logging():
            return _quantize(cfg, d, t0, source, bars)
    except BaseException as e:
        d.post_error(str(e) or type(e).__name__)
        raise
    finally:
        d.close()


def _quantize(cfg: Config, d: dist.Dist, t0: float, source: tuple, bars: progress.Progress) -> Summary:
    seconds = {}
    src_cfg, arch, ckpt, dtype = source
    out = cfg.save_directory
    fmt = output_format(cfg, ckpt, arch, dtype)
    samples = None
    if d.is_main:
        try:
            samples, digest = _start_output(cfg, ckpt, arch, dtype)
            with outdir.disk_errors(out, "creating the weight files"):
                fmt.layout.create(out)
                token = output.share_token(out) if d.world_size > 1 else None
        except UserError as e:
            d.broadcast_object(("error", str(e), None, None, None, None), "the calibration images")
            raise
        lengths = [s.input_ids.shape[-1] for s in samples]
        n, tokens, longest = len(samples), round(sum(lengths) / len(samples)), max(lengths)
        d.broadcast_object(("samples", n, digest, token, tokens, longest), "the calibration images")
    else:
        what, n, digest, token, tokens, longest = d.broadcast_object(None, "the calibration images")
        if what == "error":
            raise UserError(f"rank 0: {n}")
    # every rank the same plan, its layers balanced for the images as they are
    layout = _plan(cfg, arch, dtype, d.world_size, cfg.max_memory_bytes or dist.memory_budget(d.device), n, tokens,
                   longest)
    if d.is_main and d.world_size > 1:
        log.info("plan:\n%s", plan.report(layout, arch, dtype))
    if d.is_main:
        log.info("calibrating on %d images from %s", n, cfg.calib_images)
    try:
        return _run(cfg, d, t0, source, bars, layout, fmt, samples, n, digest, token, seconds)
    except BaseException:
        if d.is_main:
            fmt.layout.abort(out)
        raise


def _run(cfg: Config, d: dist.Dist, t0: float, source: tuple, bars: progress.Progress, layout: plan.Plan,
         fmt: OutputFormat, samples: list | None, n: int, digest: str, token: str | None, seconds: dict) -> Summary:
    src_cfg, arch, ckpt, dtype = source
    out = cfg.save_directory
    mine = layout.ranks[d.rank]
    shared = d.world_size == 1 or d.agree(output.sees_token(out, token), "whether save_directory is shared")
    if not shared and d.is_main:
        log.warning("save_directory %s is not the same directory on every rank (hosts that do not share it): rank 0 "
                    "writes every weight, reading the other ranks' layers from the source a second time", out)
    weights = output.Weights(out, fmt.layout, fmt.specs, output.owners(fmt.specs, layout, shared), d.rank, ckpt,
                             dtype, fmt.convert)
    seconds["plan"] = time.perf_counter() - t0

    peaks = {"plan": allocator.peak_rss()}
    allocator.reset_peak()
    t = time.perf_counter()
    jour = journal.Journal(out, digest, cfg.resume)
    compute = calibrate.compute_dtype(d.device.type, dtype)
    model = qwen2vl.build_skeleton(qwen2vl.load_hf_config(cfg.model_path, cfg.trust_remote_code), compute, d.device)

    def on_unit(prefix, module, results):
        with outdir.disk_errors(out, "writing the output"):
            weights.write_unit(prefix, module, results)

    stage = calibrate.Stage(d, model, ckpt, arch, mine.layers, mine.resident, cfg.act_method, cfg.anti_method,
                            act_symmetric=cfg.act_symmetric,
                            on_layer=_solved(d, bars), on_sample=_progress(bars) if d.is_main else None,
                            on_unit=on_unit, journal=jour, dtype=dtype, compute=compute,
                            free_pixels=True)  # nothing after calibration reads the samples' pixels
    if mine.resident:  # samples go through the whole slice one by one (layer-major: the solve bar is the progress)
        bars.start("calibrate", n, "calibrate", unit="sample")
    bars.start("solve", arch.vision_depth * d.is_main + len(range(*mine.layers)), "solve", unit="layer")
    with outdir.disk_errors(out, "saving solved layers to the journal"):
        results = calibrate.calibrate(stage, samples, n)
    if jour.restored:
        log.info("resume: %d results of this rank's layers came from the journal", jour.restored)
    read = list(ckpt.opened)
    seconds["calibrate"] = time.perf_counter() - t
    del model, stage
    peaks["calibrate"] = allocator.peak_rss()

    allocator.reset_peak()
    t = time.perf_counter()
    others = {}
    if d.is_main and not shared:  # rank 0 writes the other ranks' layers too: it needs their results first
        _gather(d, results, others)
    bars.start("write", weights.rest_bytes, "write", unit="B", scale=True)
    weights.files.on_write = lambda nbytes: bars.update("write", nbytes)
    try:
        with outdir.disk_errors(out, "writing the output"):
            weights.write_rest(results)
            weights.close()
    except BaseException:
        weights.files.drop()
        raise
    written = weights.files.bytes_written
    if not d.is_main:
        seconds["write"] = time.perf_counter() - t
        peaks["write"] = allocator.peak_rss()
        d.send_object((results, {"peak_rss": peaks, "bytes_read": ckpt.bytes_read, "written": weights.files.written,
                                 "bytes_written": written}), 0, "this rank's results")
        return Summary(out, [], written, 0, seconds, d.rank, read, ckpt.bytes_read, peaks, layers=mine.layers)
    if shared:
        _gather(d, results, others)
    log.info("calibration done in %.1f s: %d results from %d ranks; %s", seconds["calibrate"], len(results),
             d.world_size, "finishing the output")
    names = set(weights.files.written).union(*(o["written"] for o in others.values()))
    written += sum(o["bytes_written"] for o in others.values())
    with outdir.disk_errors(out, "writing the output"):
        files = finish_output(cfg, fmt, names, src_cfg, arch)
    seconds["write"] = time.perf_counter() - t
    peaks["write"] = allocator.peak_rss()
    seconds["total"] = time.perf_counter() - t0
    source_bytes = sum(ckpt.nbytes(n) for n in ckpt.names())
    return Summary(out, files, written, source_bytes, seconds, d.rank, read, ckpt.bytes_read, peaks, others,
                   mine.layers)


def _gather(d: dist.Dist, results: dict, others: dict) -> None:
    """Rank 0: every other rank's results into `results`, its figures into `others`."""
    for r in range(1, d.world_size):
        got, others[r] = d.recv_object(r, f"rank {r}'s results")
        results.update(got)


def _solved(d: dist.Dist, bars: progress.Progress):
    """Log each layer this rank has finished (info on rank 0, whose log is the progress; debug elsewhere)."""
    done = []

    def on_layer(prefix: str, restored: bool = False) -> None:
        done.append(prefix)
        bars.update("solve", postfix=prefix.rstrip("."))
        log.log(logging.INFO if d.is_main and not bars.enabled else logging.DEBUG, "%s %s (%d of this rank's layers)",
                "restored from the journal:" if restored else "solved", prefix.rstrip("."), len(done))
    return on_layer


def _progress(bars: progress.Progress):
    def on_sample(k: int, n: int) -> None:
        bars.update("calibrate")
        log.log(logging.DEBUG if bars.enabled else logging.INFO, "sample %d/%d through the pipeline", k + 1, n)
    return on_sample
