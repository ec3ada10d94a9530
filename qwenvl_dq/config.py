"""The run's configuration: one frozen dataclass, field for field with the CLI flags, and its validation."""

from __future__ import annotations

import dataclasses
import os
import re

from . import outdir
from .errors import UserError

ANTI_METHODS = ("m2", "m4", "none")
DEVICE_TYPES = ("cpu", "npu", "cuda")
ACT_METHODS = {"minmax": 1, "histogram": 2}
OUTPUT_FORMATS = ("mindie", "compressed-tensors")
DEFAULT_PROMPT = "Please describe this picture in detail."  # the reference's calibration prompt
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclasses.dataclass(frozen=True)
class Config:
    # the seed's flags
    model_path: str
    save_directory: str
    calib_images: str = "../calibImages"
    part_file_size: float | None = None
    w_bit: int = 8
    a_bit: int = 8
    device_type: str = "npu"
    trust_remote_code: bool = False
    anti_method: str = "m2"
    mindie_format: bool = False
    # ours
    calib_num: int | None = None
    prompt: str = DEFAULT_PROMPT
    min_pixels: int | None = None
    max_pixels: int | None = None
    act_method: str = "histogram"
    act_symmetric: bool = False
    output_format: str = "mindie"
    dry_run: bool = False
    overwrite: bool = False
    resume: bool = False
    log_level: str = "info"
    quiet: bool = False  # no progress bars, warnings and errors only
    evaluate_images: str | None = None  # held-out images to evaluate the output on once it is written
    dist_timeout: float = 1800.0
    max_memory: float | None = None  # GiB per rank
    ranks: int | None = None  # --dry_run only: plan for this many ranks

    @property
    def part_bytes(self) -> int | None:
        return None if self.part_file_size is None else max(1, int(self.part_file_size * (1 << 30)))

    @property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory is None else int(self.max_memory * (1 << 30))

    def validate(self, main: bool = True) -> "Config":
        """Check everything that can be checked without loading weights; raise UserError naming the bad value.
        Ranks other than 0 (main=False) skip the output directory: only rank 0 writes, maybe on another host."""
        if self.w_bit != 8:
            raise UserError(f"w_bit: {self.w_bit} is not supported; Qwen2-VL W8A8 needs --w_bit 8")
        if self.a_bit != 8:
            raise UserError(f"a_bit: {self.a_bit} is not supported; Qwen2-VL W8A8 needs --a_bit 8")
        if self.part_file_size is not None and not self.part_file_size > 0:
            raise UserError(f"part_file_size: {self.part_file_size} must be a positive number of GB "
                            "(or leave it out for a single file)")
        if self.anti_method not in ANTI_METHODS:
            raise UserError(f"anti_method: {self.anti_method!r} is not one of {', '.join(ANTI_METHODS)}")
        if self.device_type not in DEVICE_TYPES:
            raise UserError(f"device_type: {self.device_type!r} is not one of {', '.join(DEVICE_TYPES)}")
        if self.act_method not in ACT_METHODS:
            raise UserError(f"act_method: {self.act_method!r} is not one of {', '.join(ACT_METHODS)}")
        if self.output_format not in OUTPUT_FORMATS:
            raise UserError(f"output_format: {self.output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
        if self.mindie_format and self.output_format != "mindie":
            raise UserError(f"output_format: --mindie_format writes MindIE's layout and --output_format "
                            f"{self.output_format} writes another; pass one of them")
        if self.calib_num is not None and self.calib_num < 1:
            raise UserError(f"calib_num: {self.calib_num} must be at least 1")
        if not self.dist_timeout > 0:
            raise UserError(f"dist_timeout: {self.dist_timeout} must be a positive number of seconds")
        if self.max_memory is not None and not self.max_memory > 0:
            raise UserError(f"max_memory: {self.max_memory} must be a positive number of GiB")
        if self.ranks is not None and (self.ranks < 1 or not self.dry_run):
            raise UserError(f"ranks: {self.ranks}: --ranks N (N >= 1) plans for N ranks and goes with --dry_run; "
                            "a real run takes its ranks from the launcher (launcher/torchrun.sh)")
        try:
            os.stat(self.model_path)
        except FileNotFoundError:
            hub = re.fullmatch(r"[\w.-]+/[\w.-]+", self.model_path) is not None
            hint = (" (qwenvl-dq never downloads: fetch the model first, e.g. huggingface-cli download "
                    f"{self.model_path} --local-dir DIR, and pass DIR)" if hub else "")
            raise UserError(f"model_path: {self.model_path} does not exist{hint}; pass the float Qwen2-VL model "
                            "folder") from None
        except OSError as e:
            raise UserError(f"model_path: {self.model_path} cannot be read ({e.strerror}); check its permissions") \
                from None
        if not os.path.isdir(self.model_path):
            raise UserError(f"model_path: {self.model_path} is not a directory; pass the float Qwen2-VL model folder")
        if not os.access(self.model_path, os.R_OK | os.X_OK):
            raise UserError(f"model_path: {self.model_path} is not readable; check its permissions")
        if not main or self.dry_run:
            return self
        if self.evaluate_images is not None:
            from .calib_data import list_images

            list_images(self.evaluate_images, role="evaluate_images")
            if os.path.realpath(self.evaluate_images) == os.path.realpath(self.calib_images):
                raise UserError(f"evaluate_images: {self.evaluate_images} is the calibration folder; evaluate on "
                                "held-out images the calibration did not see")
        outdir.check(self.save_directory, self.model_path, self.overwrite, self.resume)
        return self
