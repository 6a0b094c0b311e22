"""The one exception type for everything a user can cause."""


class Cryo2DError(Exception):
    """A user-caused problem (bad file, bad option).

    The message is one line naming the file (where there is one) and what is
    wrong; the CLI prints it as ``cryo2d: error: <message>`` and exits 1.
    """
