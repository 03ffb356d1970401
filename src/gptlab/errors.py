"""Exceptions for user mistakes. The CLI prints these as one line on stderr and exits non-zero; anything else
is a bug and keeps its traceback."""


class GptlabError(Exception):
    """A mistake the user can fix: the message names the field, path or value at fault."""


class ConfigError(GptlabError, ValueError):
    """An invalid configuration value or combination of values."""


class CheckpointError(GptlabError):
    """A checkpoint that cannot be found, read, or does not fit the model."""
