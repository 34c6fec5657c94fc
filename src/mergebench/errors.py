"""User-facing errors: the CLI prints these as one line, without a traceback; `suggest` ends their messages."""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class ConfigError(ValueError):
    """A bad value in the configuration: the message names the key, the value and what is allowed."""


class DataNotFoundError(ConfigError):
    """A dataset's files are missing: the message names the expected path and how to get them."""


class DataError(ConfigError):
    """A dataset's files are there but unreadable (truncated, malformed, mismatched): the message names the file."""


def suggest(word: str, options: Sequence[str], template: str = "{}") -> str:
    """The tail of an 'is not known' message: the closest option first when one is close, since a typo wants its fix
    rather than a list to search, then all of them. `template` puts the match back in place ('train.{}')."""
    close = difflib.get_close_matches(word, options, n=1)
    hint = f"did you mean {template.format(close[0])}? " if close else ""
    return f"{hint}allowed: {', '.join(options)}"
