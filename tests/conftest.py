"""Shared fixtures: plans and permuted copies of the zoo models, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "HF_OTFUSION_PLAN_CACHE" not in os.environ:  # plans traced by the tests stay out of the user's cache
    import tempfile

    os.environ["HF_OTFUSION_PLAN_CACHE"] = tempfile.mkdtemp(prefix="hf-otfusion-plans-")
    os.environ["HF_OTFUSION_TEST_PLANS"] = os.environ["HF_OTFUSION_PLAN_CACHE"]
if os.environ.get("HF_OTFUSION_TEST_PLANS") and os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n: each worker its own cache, so that no test finds a plan another worker's test just traced
    os.environ["HF_OTFUSION_PLAN_CACHE"] = os.path.join(os.environ["HF_OTFUSION_TEST_PLANS"],
                                                        os.environ["PYTEST_XDIST_WORKER"])

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N processes share the cores, one torch thread each
    torch.set_num_threads(1)

from hub_server import hub_server  # noqa: E402, F401 - the Hub test server fixture, for every test module
from zoo import make  # noqa: E402

from hf_otfusion import build_plan, random_permutation  # noqa: E402

_CACHE: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module: tiny models run fastest so, and stay fast when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def family():
    """family(name) -> (model, inputs, plan, permuted copy), cached across tests."""

    def get(name: str):
        if name not in _CACHE:
            model, x = make(name)
            plan = build_plan(model, x)
            _CACHE[name] = (model, x, plan, random_permutation(model, plan, seed=1))
        return _CACHE[name]

    return get
