"""The one exception type for everything a user can cause (and a subclass a caller may wait out)."""


class Cryo2DError(Exception):
    """A user-caused problem (bad file, bad option).

    The message is one line naming the file (where there is one) and what is
    wrong; the CLI prints it as ``cryo2d: error: <message>`` and exits 1.
    """


class NoParticles(Cryo2DError):
    """A particle file that holds no particles (a growing file's header before its first row)."""
