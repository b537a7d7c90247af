"""Phase timing: exclusive nested phases that add up to the profiled time; a no-op when nothing profiles."""

from __future__ import annotations

import time

import torch
from torch import nn

from hf_otfusion import fuse
from hf_otfusion.profile import Profile, profiling, record_space, timed


def test_nested_phases_are_exclusive_and_add_up():
    with profiling() as prof:
        with timed("outer"):
            time.sleep(0.05)
            with timed("inner"):
                time.sleep(0.1)
        record_space("s", 0.5)
    assert 0.1 <= prof.seconds["inner"] < 0.15
    assert 0.05 <= prof.seconds["outer"] < 0.1  # the inner phase is not counted twice
    assert abs(prof.total - sum(prof.seconds.values())) < 1e-9
    assert prof.calls == {"other": 1, "outer": 1, "inner": 1}
    assert prof.spaces == {"s": 0.5}
    table = prof.table()
    assert table.index("| inner |") < table.index("| outer |")  # largest first
    assert "| s | 0.500 |" in table


def test_timed_without_a_profile_records_nothing():
    with timed("cost"):
        record_space("x", 1.0)
    assert Profile().seconds == {}


def test_fuse_reports_its_phases_and_spaces():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(2)]
    with profiling() as prof:
        fuse(models, example_input=torch.randn(2, 8), progress=False)
    assert {"trace", "cost", "solve", "transport", "average"} <= set(prof.seconds)
    assert set(prof.spaces) == {"0.weight:0"}
