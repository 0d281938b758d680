"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class SegrankError(Exception):
    """Bad input (file, key or value) that the user can fix; the message names it."""


class CheckpointError(SegrankError):
    """A file that is not a usable checkpoint, or one that does not fit the architecture."""


class ConfigError(SegrankError, ValueError):
    """A configuration that cannot be used; the message names the key and the problem."""
