"""Progress bars on rank 0: calibration (samples through the pipeline), solving (this rank's layers) and
writing (bytes). Shown only on a terminal and without --quiet; anywhere else (a log file, CI, a batch job) the log
lines are the progress, and while bars are shown log lines are printed above them instead of through them."""

from __future__ import annotations

import contextlib
import shutil
import sys

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


class Progress:
    """Named bars, created on first use; a disabled Progress does nothing."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._bars: dict[str, tqdm] = {}

    @classmethod
    def for_rank(cls, is_main: bool, quiet: bool, stream=None) -> "Progress":
        stream = stream or sys.stderr
        return cls(is_main and not quiet and stream.isatty(), stream)

    def start(self, key: str, total: int, desc: str, unit: str = "it", scale: bool = False) -> None:
        if not self.enabled:
            return
        if key in self._bars:
            self._bars[key].close()
        width = shutil.get_terminal_size((100, 24)).columns  # a terminal that reports no size gets 100 columns
        self._bars[key] = tqdm(total=total, desc=f"{desc:<9}", unit=unit, unit_scale=scale,
                               unit_divisor=1024 if scale else 1000, file=self.stream, ncols=width)

    def update(self, key: str, n: int = 1, postfix: str | None = None) -> None:
        bar = self._bars.get(key)
        if bar is None:
            return
        bar.update(n)
        if postfix is not None:
            bar.set_postfix_str(postfix, refresh=False)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    @contextlib.contextmanager
    def logging(self):
        """While bars may be drawn, route log records through tqdm.write so they do not tear the bars."""
        if not self.enabled:
            yield
            return
        with logging_redirect_tqdm():
            try:
                yield
            finally:
                self.close()
