"""Every error a user can meet is defined in ``hf_otfusion.errors`` and exported from the package."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import hf_otfusion
from hf_otfusion import errors


def _modules():
    for info in pkgutil.walk_packages(hf_otfusion.__path__, "hf_otfusion."):
        yield importlib.import_module(info.name)


def test_every_error_class_lives_in_errors_and_is_exported():
    found = {}
    for module in _modules():
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__.startswith("hf_otfusion")
                    and not name.startswith("_")):  # private ones are control flow, never shown to a user
                found[name] = obj
    assert found, "no error classes found"
    misplaced = sorted(name for name, cls in found.items() if cls.__module__ != errors.__name__)
    assert misplaced == []
    assert all(issubclass(cls, errors.FusionError) for cls in found.values())
    assert sorted(found) == sorted(n for n in hf_otfusion.__all__ if n.endswith(("Error", "Timeout")))
    assert all(getattr(hf_otfusion, name) is cls for name, cls in found.items())
