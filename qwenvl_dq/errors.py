"""The one exception type for problems the user can fix (bad flags, bad files, bad images)."""


class UserError(Exception):
    """A problem with the user's input; the CLI prints the message, without a traceback, and exits non-zero.

    The message names the bad value and the fix, e.g.
    ``calib_images: /data/imgs holds no image files (looked for .jpg .jpeg .png .bmp .webp)``.
    """


class RankLost(Exception):
    """Another rank of a multi-rank run died, hung or failed; the message names it. The CLI prints it as one line
    and exits non-zero; the output directory stays marked INCOMPLETE."""
