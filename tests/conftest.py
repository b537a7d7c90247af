"""Shared fixtures: plans and permuted copies of the zoo models, built once per session.

``--lazy-fuse`` (the honesty run of the exactness tests, issue 29): ``hf_otfusion.fuse`` is replaced, everywhere it
is bound (the package, its module ``hf_otfusion.fuse``, every imported ``hf_otfusion`` module that imported it), by
a lazy one that returns a copy of the target and does nothing else. A test that still passes so does not see the
engine. At the end the run prints, per test file, how many tests called ``fuse`` and how many of those passed
(run it in one process, without ``-n``: each process keeps its own count)::

    python -m pytest -q -p no:cacheprovider --lazy-fuse tests/test_fuse.py tests/test_transformers.py \
        tests/test_decoders.py tests/test_trace.py
"""

from __future__ import annotations

import copy
import os
import sys
from collections import defaultdict
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
from hf_otfusion.verify import verify_plan  # noqa: E402

_CACHE: dict[str, tuple] = {}
_OTHER_CACHE: dict[str, tuple] = {}


# ----------------------------------------------------------------------------------------------------------
# --lazy-fuse: the exactness tests must fail when fuse does no work

_LAZY = {"current": None, "callers": set(), "failed": set(), "skipped": set(), "installed": False}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--lazy-fuse", action="store_true", default=False,
                     help="replace hf_otfusion.fuse by one that returns a copy of the target (the honesty run of "
                          "the exactness tests: each fuse test should then fail)")


def lazy_fuse(models, options=None, *, target: int = 0, **_: object):
    """fuse that does no work: a copy of the target, whatever the other models are."""
    if _LAZY["current"] is not None:
        _LAZY["callers"].add(_LAZY["current"])
    return copy.deepcopy(models[target])


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("--lazy-fuse"):
        return
    import hf_otfusion

    real = sys.modules["hf_otfusion.fuse"].fuse  # (``import hf_otfusion.fuse as m`` gives the function)
    for name, module in list(sys.modules.items()):
        if (name == "hf_otfusion" or name.startswith("hf_otfusion.")) and getattr(module, "fuse", None) is real:
            module.fuse = lazy_fuse
    from dataclasses import replace

    from hf_otfusion.registry import MERGE_METHODS

    otfusion = MERGE_METHODS.get("otfusion")  # the merge command calls the registered unit's fn
    if otfusion.fn is real:
        MERGE_METHODS.register(replace(otfusion, fn=lazy_fuse))
    assert hf_otfusion.fuse is lazy_fuse and sys.modules["hf_otfusion.fuse"].fuse is lazy_fuse
    _LAZY["installed"] = True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _LAZY["current"] = item.nodeid
    try:
        return (yield)
    finally:
        _LAZY["current"] = None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _LAZY["failed"].add(report.nodeid)
    elif report.skipped:
        _LAZY["skipped"].add(report.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _LAZY["installed"]:
        return
    per_file: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for nodeid in _LAZY["callers"]:
        counts = per_file[nodeid.split("::")[0]]
        counts[0] += 1
        counts[1] += nodeid not in _LAZY["failed"] and nodeid not in _LAZY["skipped"]
    terminalreporter.section("lazy fuse: tests that call fuse, and how many of them pass (should be few)")
    for path, (calls, passed) in sorted(per_file.items()):
        terminalreporter.write_line(f"{path}: {calls} call fuse, {passed} pass ({passed / calls:.0%})")


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
            plan = verify_plan(model, build_plan(model, x), x)  # once: fuse then trusts it (it checks an unchecked one)
            _CACHE[name] = (model, x, plan, random_permutation(model, plan, seed=1))
        return _CACHE[name]

    return get


@pytest.fixture
def other(family):
    """other(name) -> (B, B randomly permuted by the plan of ``family(name)``): a second model of the family, every
    entry of its state dict random (BatchNorm statistics from a batch, then moved), cached across tests.

    ``fuse([A, perm(B)], weights=[0, 1])`` must compute B's function, and ``fuse([A, perm(B)])`` equal
    ``fuse([A, B])``: checks a copy of the target cannot pass, unlike ``fuse([A, perm(A)]) == A``."""
    from zoo import live_batch_norms, randomize_state

    def get(name: str):
        if name not in _OTHER_CACHE:
            _, x, plan, _ = family(name)
            model = randomize_state(make(name, seed=11)[0], seed=11).eval()
            if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                model = live_batch_norms(model, x, seed=11)
            _OTHER_CACHE[name] = (model, random_permutation(model, plan, seed=5))
        return _OTHER_CACHE[name]

    return get
