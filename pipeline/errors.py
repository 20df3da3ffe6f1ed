"""The one exception type a user sees: a problem with their input, stated so they can fix it."""


class DistillError(Exception):
    """Bad input or an unusable state. The CLI prints ``error: <message>`` and exits with status 2.

    The message is one line that says what is wrong and what to do about it.
    """
