"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (missing/corrupt file, wrong option): no traceback."""
