"""The package's own error types: every failure a user can cause raises one of these."""


class SupsupError(Exception):
    """Base class for every error supsup-deploy raises on bad input or bad files.

    The message is one line that names the problem (and the file, where there is one);
    the CLI prints it as it is and exits non-zero.
    """


class ConfigError(SupsupError, ValueError):
    """An argument or setting is out of range or inconsistent."""


class DatasetNotFoundError(SupsupError, FileNotFoundError):
    """A dataset's files were not found where they were looked for."""


class FormatError(SupsupError):
    """A file on disk is missing, truncated, corrupt or does not match what refers to it."""
