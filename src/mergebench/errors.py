"""User-facing errors: the CLI prints these as one line, without a traceback."""


class ConfigError(ValueError):
    """A bad value in the configuration: the message names the key, the value and what is allowed."""


class DataNotFoundError(ConfigError):
    """A dataset's files are missing: the message names the expected path and how to get them."""


class DataError(ConfigError):
    """A dataset's files are there but unreadable (truncated, malformed, mismatched): the message names the file."""
