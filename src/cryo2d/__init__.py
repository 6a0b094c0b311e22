"""cryo2d: cryo-EM 2D classification with online EM, RELION/CryoSPARC files in and out.

The command line's operations as Python functions::

    import cryo2d

    particles = cryo2d.read_particles("Extract/job012/particles.star")
    job = cryo2d.classify(particles, "Class2D/run1", cryo2d.EMConfig(n_classes=50))
    cryo2d.select("Class2D/run1", "Select/run1")          # automatic selection

``classify``, ``select``, ``simulate``, ``stream`` and ``rebalance`` are
also the modules that hold them (``cryo2d.classify.ClassifyResult``); calling
the module calls the function. They are imported on first use, so
``import cryo2d`` alone does not load torch.
"""
from __future__ import annotations

import importlib

from cryo2d.errors import Cryo2DError

__version__ = "0.1.0"

#: Name -> (module, attribute or None for the module itself, callable as its function).
_LAZY = {
    "classify": ("cryo2d.classify", None),
    "select": ("cryo2d.select", None),
    "simulate": ("cryo2d.simulate", None),
    "stream": ("cryo2d.stream", None),
    "rebalance": ("cryo2d.rebalance", None),
    "read_particles": ("cryo2d.io", "read_particles"),
    "EMConfig": ("cryo2d.em.config", "EMConfig"),
}

__all__ = ["Cryo2DError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cryo2d' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
