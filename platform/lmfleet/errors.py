"""Errors caused by the user's input. The CLI prints these as one clear message, never a traceback."""


class UserError(Exception):
    """A mistake in a config file, an argument or an input path."""


class ConfigError(UserError):
    """A config file that does not parse or does not validate."""


class InputError(UserError):
    """An input path that is missing or unreadable."""


class StageFailed(UserError):
    """A stage that ran and failed for a reason its message explains (a chained job, every trial of a
    search); the CLI exits 1."""
