"""Errors that reach users. Each message names the problem and the fix."""


class FineMoEError(Exception):
    """Base class: a user-facing error with an actionable message (never a bare traceback)."""


class ConfigError(FineMoEError, ValueError):
    """A flag or config value is invalid (bad budget string, unknown device, ...)."""


class UnsupportedModelError(FineMoEError):
    """The checkpoint's architecture has no adapter."""


class BudgetTooSmallError(ConfigError):
    """The expert budget cannot hold one layer's top-k experts."""


class UnknownPolicyError(ConfigError):
    """`--policy NAME` names no registered policy."""


class ModelLoadError(FineMoEError):
    """The checkpoint could not be found or read."""


class TraceError(FineMoEError):
    """A trace file is missing, unreadable, of another version, or inconsistent."""


class MissingExtraError(FineMoEError):
    """A command needs an optional dependency (a pip extra) that is not installed."""
