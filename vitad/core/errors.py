"""The base class of the input errors that stages report in one line instead of a traceback.

Its own module, importing nothing, so that :mod:`vitad.core.cli` catches every such error without
importing the modules that raise them: DVC's code deps of a stage are its script's import closure,
and catching ``ScoresError`` through its module made every stage, feature extraction included,
depend on (and re-run for every edit of) the score-file and heat-map code.
"""


class InputError(ValueError):
    """A file or parameter the user supplied is missing, malformed or inconsistent; the message
    names it and says what to do."""
