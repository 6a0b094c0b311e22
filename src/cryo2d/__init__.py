"""cryo2d: cryo-EM 2D classification with online EM, RELION/CryoSPARC files in and out."""
from cryo2d.errors import Cryo2DError

__version__ = "0.1.0"

__all__ = ["Cryo2DError", "__version__"]
