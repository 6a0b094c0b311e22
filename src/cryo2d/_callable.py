"""Submodules that can be called as their main function: ``cryo2d.classify(...)``.

``cryo2d.classify`` is both the module ``cryo2d/classify.py`` and, as DESIGN
and the package docstring promise, the operation it holds. A module cannot be
replaced by its function without breaking ``import cryo2d.classify`` and
``from cryo2d.classify import ...``, so the module is made callable instead:
calling it calls the module's attribute of the same name (looked up at each
call, so a patched function is the one called).
"""
from __future__ import annotations

import inspect
import sys
import types


class CallableModule(types.ModuleType):
    """A module whose call is that of its function of the same name."""

    def _callable_target(self):
        return getattr(self, self.__name__.rpartition(".")[2])

    def __call__(self, *args, **kwargs):
        return self._callable_target()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        """The function's signature, for ``inspect.signature`` and a notebook's call tips."""
        return inspect.signature(self._callable_target())


def make_callable(module_name: str) -> None:
    """Make the module ``module_name`` (already in ``sys.modules``) callable as its same-named function."""
    sys.modules[module_name].__class__ = CallableModule
