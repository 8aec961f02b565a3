"""The one error type a user should ever see: a clear, one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (a file, a line, a key, a flag). The CLI prints it on one line
    and exits with code 2, without a traceback. Name what is wrong and where."""

    exit_code = 2
