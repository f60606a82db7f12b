"""Errors the engine raises for the user's mistakes (shown as one line, never a traceback)."""


class BadInput(ValueError):
    """The user asked for something that cannot be done: a one-line message says what and why.

    The CLI maps it to exit status 2; the app shows the message and changes nothing.
    """


class Cancelled(Exception):
    """``should_stop()`` returned True during a long engine call."""


def exception_line(exc: BaseException, limit: int = 200) -> str:
    """A library exception as one short line for a BadInput message: its lines joined (pydantic-
    style errors put the reason on the second line), a KeyError said as the missing key."""
    if isinstance(exc, KeyError) and exc.args:
        text = f"missing {exc.args[0]!r}"
    else:
        text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    text = text or exc.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
