"""The one exception type for problems the user can fix (bad flags, bad files, bad images)."""


class UserError(Exception):
    """A problem with the user's input; the CLI prints the message, without a traceback, and exits non-zero.

    The message names the bad value and the fix, e.g.
    ``calib_images: /data/imgs holds no image files (looked for .jpg .jpeg .png .bmp .webp)``.
    """
