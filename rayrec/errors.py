"""The one exception type for mistakes a user can fix.

The CLI prints a UserError as a single line and exits with status 2; everything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a wrong name, key, value, path or resource request.

    The message must name the bad value and what would be valid.
    """


def did_you_mean(value: str, valid) -> str:
    """A short 'valid: a, b, c' hint, with the closest match first when there is one."""
    import difflib

    valid = sorted(str(v) for v in valid)
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"valid: {', '.join(valid)}{hint}"


def first_line(exc: BaseException, typed: bool = True) -> str:
    """'Type: first line of the message' for logs and tables; 'Type' alone for an empty message.
    `typed=False`: the message's first line alone, for a user error that says what failed.

    Ray wraps a trial's or task's exception (RayTaskError, whose text starts with the
    worker's traceback header); the original exception, in `.cause`, is the one described.
    """
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    lines = str(exc).strip().splitlines()
    if not typed:
        return lines[0] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
