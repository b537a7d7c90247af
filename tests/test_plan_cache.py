"""The plan cache: a second merge of an architecture reads its plan instead of tracing; any change in the key
(config, widths, input) traces again; ``--no-plan-cache`` and a corrupt entry trace; the output is the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import hf_resnet, timm_resnet
from torch import nn
from typer.testing import CliRunner

from hf_otfusion import merge, trace
from hf_otfusion.cli import app
from hf_otfusion.config import load_config, parse_config
from hf_otfusion.plan_cache import ENV_VAR, cache_dir, cached_plan, key_hash, plan_key

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_MODELS = [ROOT / "examples/models/mnist-resnet-seed0", ROOT / "examples/models/mnist-resnet-seed1"]


@pytest.fixture
def calls(tmp_path, monkeypatch) -> dict[str, int]:
    """The cache in a tmp folder, and a count of plan builds and exports made by the tracer."""
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "plans"))
    count = {"build_plan": 0, "export": 0}
    build, export = trace.build_plan, trace.core.export_model

    def counting_build(*args, **kwargs):
        count["build_plan"] += 1
        return build(*args, **kwargs)

    def counting_export(*args, **kwargs):
        count["export"] += 1
        return export(*args, **kwargs)

    monkeypatch.setattr(trace, "build_plan", counting_build)
    monkeypatch.setattr(trace.core, "export_model", counting_export)
    return count


def _weights_config(paths) -> object:
    return parse_config({"merge_method": "otfusion", "models": [{"model": str(p)} for p in paths],
                         "parameters": {"alignment": "weights"}})


def _entries() -> list[Path]:
    return sorted(cache_dir().glob("*.json"))


def test_second_merge_of_the_example_does_not_trace(tmp_path, calls):
    config = _weights_config(EXAMPLE_MODELS)  # streamed from disk: the plan is all the tracing it does
    first = merge(config, tmp_path / "one", progress=False)
    assert calls == {"build_plan": 1, "export": 1} and len(_entries()) == 1
    second = merge(config, tmp_path / "two", progress=False)
    assert calls == {"build_plan": 1, "export": 1}, "the second merge traced"
    assert first.streamed and second.streamed and second.plan == first.plan
    for name in ("model.safetensors", "plan.json", "config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_bundled_activations_example_reuses_its_plan(tmp_path, calls, monkeypatch):
    """The bundled config (activations, BN reset), with less calibration data and no evaluation to stay short: the
    plan is read from the cache the second time (the engine still exports the graph it records activations on)."""
    monkeypatch.chdir(ROOT)  # the example's paths are relative to the repository root
    config = load_config(ROOT / "examples/mnist-otfusion.yml")
    calibration = config.calibration.model_copy(update={"num_samples": 40, "batch_size": 20})
    config = config.model_copy(update={"calibration": calibration, "evaluation": None})
    first = merge(config, tmp_path / "one", progress=False)
    assert calls["build_plan"] == 1
    second = merge(config, tmp_path / "two", progress=False)
    assert calls["build_plan"] == 1 and second.plan == first.plan
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_architecture_traces_again(tmp_path, calls):
    narrow = [timm_resnet(tmp_path / "a", seed=0), timm_resnet(tmp_path / "b", seed=1)]
    wide = [timm_resnet(tmp_path / "c", seed=0, width=2), timm_resnet(tmp_path / "d", seed=1, width=2)]
    merge(_weights_config(narrow), tmp_path / "out1", progress=False)
    merge(_weights_config(wide), tmp_path / "out2", progress=False)
    assert calls["build_plan"] == 2 and len(_entries()) == 2
    merge(_weights_config(wide), tmp_path / "out3", progress=False, stream=False)  # loaded, not meta: own entry
    merge(_weights_config(wide), tmp_path / "out4", progress=False, stream=False)
    assert calls["build_plan"] == 3 and len(_entries()) == 3


def test_transformers_config_is_in_the_key(tmp_path, calls):
    parents = [hf_resnet(tmp_path / "a", seed=0), hf_resnet(tmp_path / "b", seed=1)]
    merge(_weights_config(parents), tmp_path / "out1", progress=False)
    merge(_weights_config(parents), tmp_path / "out2", progress=False)
    assert calls["build_plan"] == 1
    config = json.loads((parents[0] / "config.json").read_text())
    (entry,) = _entries()
    stored = json.loads(entry.read_text())["key"]
    assert stored["library"] == "transformers" and stored["architecture"] == config["architectures"][0]
    assert "_name_or_path" not in stored["config"] and "transformers_version" not in stored["config"]
    assert stored["config"]["hidden_act"] == config["hidden_act"]
    for parent in parents:  # a config change that no tensor shape shows (the activation) is a new entry
        (parent / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    merge(_weights_config(parents), tmp_path / "out3", progress=False)
    assert calls["build_plan"] == 2 and len(_entries()) == 2


def test_no_plan_cache_traces_and_writes_nothing(tmp_path, calls):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(json.dumps({"models": [{"model": str(p)} for p in EXAMPLE_MODELS],
                               "parameters": {"alignment": "weights"}}))
    runner = CliRunner()
    for i in range(2):
        result = runner.invoke(app, ["merge", str(cfg), str(tmp_path / f"out{i}"), "-q", "--device", "cpu",
                                     "--no-plan-cache"])
        assert result.exit_code == 0, result.output
    assert calls["build_plan"] == 2 and not cache_dir().exists()
    result = runner.invoke(app, ["plan", str(EXAMPLE_MODELS[0]), "-q", "--no-plan-cache"])
    assert result.exit_code == 0, result.output
    assert calls["build_plan"] == 3 and not cache_dir().exists()
    for _ in range(2):  # the plan command uses the cache too
        assert runner.invoke(app, ["plan", str(EXAMPLE_MODELS[0]), "-q"]).exit_code == 0
    assert calls["build_plan"] == 4 and len(_entries()) == 1


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(2, 4)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other key", "bad plan", "binary"])
def test_a_corrupt_entry_is_traced_again(tmp_path, calls, capsys, damage):
    model, x = _mlp()
    plan = cached_plan(model, x)
    (entry,) = _entries()
    text = entry.read_text()
    stored = json.loads(text)
    broken = {
        "garbage": "\x00not json",
        "truncated": text[: len(text) // 2],
        "other key": json.dumps({**stored, "key": {**stored["key"], "library": "elsewhere"}}),
        "bad plan": json.dumps({**stored, "plan": {"spaces": "nope"}}),
        "binary": b"\x80\xff\xfe binary, not UTF-8",
    }[damage]
    if isinstance(broken, bytes):
        entry.write_bytes(broken)
    else:
        entry.write_text(broken)
    again = cached_plan(model, x)
    assert again == plan and calls["build_plan"] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: plan cache: ignoring the unreadable entry"), err
    assert json.loads(entry.read_text()) == stored  # rewritten whole
    assert cached_plan(model, x) == plan and calls["build_plan"] == 2


def test_key_leaves_out_the_batch_and_keeps_the_rest(tmp_path, calls):
    model, x = _mlp()
    key = plan_key(model, x)
    assert key_hash(key) == key_hash(plan_key(model, torch.randn(5, 4)))  # batch size is not in the key
    assert key_hash(key) != key_hash(plan_key(model, torch.randn(2, 4).double()))
    assert key_hash(key) != key_hash(plan_key(model, x.to("meta")))
    wider = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 3))
    assert key_hash(key) != key_hash(plan_key(wider, x))
    assert key_hash(key) != key_hash(plan_key(model, x, library="timm"))
    assert not list(tmp_path.glob("plans/.*.tmp"))


def test_an_unwritable_cache_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(ENV_VAR, str(blocker / "plans"))  # under a file: the folder cannot be made
    model, x = _mlp()
    plan = cached_plan(model, x)
    assert plan.verified and plan.model_copy(update={"verification": None}) == trace.build_plan(model, x)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0]
