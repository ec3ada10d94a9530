"""The one exception type for problems the user can fix (bad flags, bad files, bad images)."""


class UserError(Exception):
    """A problem with the user's input; the CLI prints the message, without a traceback, and exits non-zero.

    The message names the bad value and the fix, e.g.
    ``calib_images: /data/imgs holds no image files (looked for .jpg .jpeg .png .bmp .webp)``.
    """


class RankLost(Exception):
    """Another rank of a multi-rank run died, hung or failed; the message names it. The CLI prints it as one line
    and exits non-zero; the output directory stays marked INCOMPLETE."""


class Stopped(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) turned into an exception, so a stop runs the same clean-up as Ctrl-C: temporary files are
    removed, the other ranks are told, the output stays marked INCOMPLETE and the journal keeps the solved layers."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
