"""The errors a user can cause, kept apart from bugs.

A `UserError` is bad input (config, data file, model path, checkpoint): the
command-line entry points print its message as one line and exit with code 2,
without a traceback. Anything else is a bug or a fault and keeps its traceback.
"""


class UserError(Exception):
    """Bad input that the user can fix; its message is one line."""

    exit_code = 2


class ConfigError(UserError):
    """A config key with a wrong name, type or value."""

    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"config error: {key}: {problem}" if key else f"config error: {problem}")


class DataError(UserError):
    """A data file that is missing, unreadable or does not fit the model."""

    def __init__(self, problem: str):
        super().__init__(f"data error: {problem}")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, workers out of step); every worker raises it at
    the same step, so no one is left waiting."""
