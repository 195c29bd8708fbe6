"""Errors raised at the engine's boundary.

Every message is one line naming the offending value and what was expected, so that the CLIs can
print it as it is and exit with code 2.  All are ValueErrors: callers may catch either.
"""


class PFError(ValueError):
    """Base class of the engine's user-facing errors."""


class ConfigError(PFError):
    """A config.json the engine cannot serve (architecture, rope scaling, head counts)."""


class LoadError(PFError):
    """A model or adapter file that is missing, unreadable, truncated or of the wrong shape."""


class RequestError(PFError):
    """Bad generation arguments: empty prompt, too long, out-of-range sampling parameters."""
