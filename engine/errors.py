"""Errors the engine raises for the user's mistakes (shown as one line, never a traceback)."""


class BadInput(ValueError):
    """The user asked for something that cannot be done: a one-line message says what and why.

    The CLI maps it to exit status 2; the app shows the message and changes nothing.
    """


class Cancelled(Exception):
    """``should_stop()`` returned True during a long engine call."""
