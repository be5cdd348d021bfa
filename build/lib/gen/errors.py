"""The errors a user can act on. Each is shown as one `error:` line (one per line of its message)
and its `exit_code` by the command wrapper (jobs/cli.py); any other exception is a bug and keeps
its traceback.

    UserError          1  bad input: a path, a damaged shard or checkpoint, a run dir in use
      ConfigError      2  impossible option values (nothing was created)
      TrainingFailed   3  non-finite or diverged losses (nothing saved after the last good checkpoint)
"""


def one_line(e):
    """An exception as one line: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class UserError(Exception):
    exit_code = 1

    def __init__(self, message, code=None):
        super().__init__(message)
        if code is not None:
            self.exit_code = code

    @property
    def code(self):  # data_prep's name for it
        return self.exit_code


class ConfigError(UserError, ValueError):
    """Impossible or contradictory option values, one per line."""
    exit_code = 2


class TrainingFailed(UserError):
    exit_code = 3
