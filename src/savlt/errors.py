"""The base of every error that is the user's to fix (bad data, option, file or weights).

The CLI prints these as one line; anything else is a bug in SAVLT and keeps its traceback.
"""


class SavltError(ValueError):
    """A problem with the user's input; the message names the file, class or option at fault."""
