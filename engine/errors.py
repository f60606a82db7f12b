"""Errors the engine raises for the user's mistakes (shown as one line, never a traceback)."""


#: Longest error line: what a person reads in a terminal or a status bar.
MAX_MESSAGE_CHARS = 500


class BadInput(ValueError):
    """The user asked for something that cannot be done: a one-line message says what and why.

    The CLI maps it to exit status 2; the app shows the message and changes nothing. The message is
    kept to one line here, whatever it quotes (a column name or a path holding a newline).
    """

    def __init__(self, message: object = "", *args: object) -> None:
        text = str(message).strip().replace("\r", "\\r").replace("\n", "\\n")
        if len(text) > MAX_MESSAGE_CHARS:  # a quoted 5000-character column name, say
            text = text[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(text, *args)


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
