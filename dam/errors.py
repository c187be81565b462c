"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class DamError(Exception):
    """A user-facing error: bad config, incompatible checkpoints, bad input tensors.

    The message must name the model, tensor or config key at fault. The CLI prints it on one line
    (``error: <message>``) and exits with status 1; no traceback is shown.
    """
