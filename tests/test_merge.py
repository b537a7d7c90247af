"""``merge.write_output``: the output folder is written as the libraries write theirs (modes from the umask)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from checkpoints import hf_resnet, timm_resnet

from hf_otfusion import merge
from hf_otfusion.config import parse_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(out: Path) -> dict[str, int]:
    """``{relative path: permission bits}`` of ``out`` and everything under it."""
    found = {".": stat.S_IMODE(out.stat().st_mode)}
    for path in sorted(out.rglob("*")):
        found[path.relative_to(out).as_posix()] = stat.S_IMODE(path.stat().st_mode)
    return found


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "loaded"])
@pytest.mark.parametrize("make", [timm_resnet, hf_resnet], ids=["timm", "transformers"])
def test_output_modes_follow_the_umask(tmp_path, umask_022, make, stream):
    parents = [make(tmp_path / "a", seed=0), make(tmp_path / "b", seed=1)]
    for path in parents[0].iterdir():  # parent files the user keeps private: the copies still follow the umask
        path.chmod(0o600)
    config = parse_config({"models": [{"model": str(p)} for p in parents]})
    out = tmp_path / "nested" / "out"
    result = merge(config, out, progress=False, stream=stream)
    assert result.streamed is stream
    modes = _modes(out)
    assert modes.pop(".") == 0o755
    assert {"model.safetensors", "config.json", "README.md", "hf_otfusion.yml", "plan.json"} <= set(modes)
    if make is hf_resnet:
        assert "preprocessor_config.json" in modes
    assert all(stat.S_ISREG((out / name).stat().st_mode) for name in modes), modes
    assert modes == dict.fromkeys(modes, 0o644)
    assert stat.S_IMODE((tmp_path / "nested").stat().st_mode) == 0o755

    # replacing an existing output gives the same modes, and no staging or backup folder stays behind
    merge(config, out, progress=False, stream=stream, overwrite=True)
    assert _modes(out) == {".": 0o755, **modes}
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_output_modes_under_another_umask(tmp_path):
    parents = [timm_resnet(tmp_path / "a", seed=0), timm_resnet(tmp_path / "b", seed=1)]
    config = parse_config({"models": [{"model": str(p)} for p in parents]})
    old = os.umask(0o077)
    try:
        merge(config, tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "out")
    assert modes.pop(".") == 0o700 and set(modes.values()) == {0o600}


def test_yaml_sweeps_reach_the_engine_and_do_not_stream(tmp_path):
    import torch

    from hf_otfusion import fuse
    from hf_otfusion.merge import streamable
    from hf_otfusion.sources import example_input, load_model

    parents = [timm_resnet(tmp_path / f"p{s}", seed=s) for s in (0, 1)]
    config = parse_config({"models": [{"model": str(p)} for p in parents], "parameters": {"sweeps": 2}})
    assert "sweeps" in streamable(config, [])
    result = merge(config, tmp_path / "out", progress=False)
    loaded = [load_model(str(p)) for p in parents]
    x = example_input(loaded[0])
    expected = fuse([m.model for m in loaded], example_input=x, sweeps=2, progress=False).state_dict()
    assert not result.streamed
    assert all(torch.equal(v, expected[k]) for k, v in result.model.state_dict().items())
