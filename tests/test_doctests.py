"""The docstring examples of every hf_otfusion module run as doctests (those that need the network or files are marked
``# doctest: +SKIP``). They run here, under tests/conftest.py, so that a plan an example traces stays out of the
user's plan cache."""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest

import hf_otfusion

MODULES = sorted(info.name for info in pkgutil.walk_packages(hf_otfusion.__path__, "hf_otfusion."))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _with_examples(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin is not None and ">>>" in open(spec.origin, encoding="utf-8").read()


@pytest.mark.parametrize("name", [m for m in MODULES if _with_examples(m)])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    out = io.StringIO()
    tests = [t for t in finder.find(module, name) if t.examples]
    assert tests, f"{name}: its '>>>' examples were not found by doctest"
    for test in tests:
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, out.getvalue()
