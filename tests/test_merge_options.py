"""The merge YAML's ``parameters.repair: repair`` and ``finetune`` section, end to end on the bundled MNIST example."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml
from typer.testing import CliRunner

from hf_otfusion.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_repair_and_finetune_from_yaml(tmp_path):
    data = str(EXAMPLES / "data" / "mnist")
    parents = [str(EXAMPLES / "models" / "mnist-resnet-seed0"), str(EXAMPLES / "models" / "mnist-resnet-seed1")]
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({
        "models": [{"model": m} for m in parents],
        "parameters": {"alignment": "activations", "repair": "repair"},
        "calibration": {"dataset": data, "split": "train", "num_samples": 200, "batch_size": 100},
        "evaluation": {"dataset": data, "split": "test", "num_samples": 200, "batch_size": 100},
        "finetune": {"dataset": data, "split": "train", "num_samples": 200, "batch_size": 50, "steps": 8,
                     "lr": 0.01, "seed": 1},
    }))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(config), str(out), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in result.output.splitlines()
            if line.startswith("| ") and not line.startswith("| model")}
    assert list(rows)[-2:] == ["OT fusion", "OT fusion + fine-tune"]
    assert [p for p in parents if p in rows] == parents  # parents are named by their reference
    for name, cells in rows.items():
        accuracy, loss, agreement = (float(c) for c in cells)
        assert 0 <= accuracy <= 100 and loss >= 0 and 0 <= agreement <= 100, name
    assert float(rows["ensemble"][2]) == 100.0
    assert float(rows["OT fusion"][0]) > float(rows["vanilla average"][0]) + 40  # measured: 91 vs 14 on 200 digits
    card = (out / "README.md").read_text()
    assert "| OT fusion + fine-tune |" in card and "| OT fusion |" in card and "agreement with ensemble" in card
    assert "repair (each channel's mean and std" in card
    assert "finetune:" in (out / "hf_otfusion.yml").read_text()
    # the saved model is the fine-tuned one, loadable with timm in the parents' architecture
    saved = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert [p.shape for p in saved.parameters()] == [p.shape for p in timm.create_model(
        f"local-dir:{parents[0]}", pretrained=True).parameters()]
    assert torch.isfinite(saved(torch.randn(2, 1, 28, 28))).all()


def test_orthogonal_maps_from_yaml_are_stated_in_the_card(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_otfusion.testing import tiny_llama

    parents = [str(tiny_llama(tmp_path / f"llama{s}", seed=s, kv_heads=2)) for s in (0, 1)]
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({
        "models": [{"model": parents[0], "parameters": {"weight": 0.0}}, {"model": parents[1]}],
        "parameters": {"residual": "orthogonal", "head_maps": "orthogonal", "hidden_maps": "signed", "sweeps": 2},
    }))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(config), str(out), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert "Maps other than permutations" in card
    assert "model.embed_tokens.weight:1: orthogonal (3 norm gains folded into their readers)" in card
    assert "a rotation per rotary channel pair (half)" in card and "an orthogonal map per head" in card
    assert "| residual stream | any orthogonal map" in card
    assert "a sign per unit (model.layers.0.mlp.up_proj and model.layers.0.mlp.down_proj)" in card
    assert "| hidden units | a permutation and a sign per unit" in card
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    other = AutoModelForCausalLM.from_pretrained(parents[1]).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # weight 0 on the target: the merge computes the other parent's function
        assert torch.allclose(merged(ids).logits, other(ids).logits, atol=1e-4)
    assert torch.equal(merged.model.norm.weight, torch.ones_like(merged.model.norm.weight))  # folded


def test_weight_matching_on_activations_from_yaml(tmp_path):
    """``alignment: activations`` with ``sweeps``: the merge runs weight matching that counts the activations too,
    says so in the card, and the result is a good fusion of the bundled MNIST ResNets."""
    data = str(EXAMPLES / "data" / "mnist")
    parents = [str(EXAMPLES / "models" / "mnist-resnet-seed0"), str(EXAMPLES / "models" / "mnist-resnet-seed1")]
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({
        "models": [{"model": m} for m in parents],
        "parameters": {"alignment": "activations", "sweeps": 2},
        "calibration": {"dataset": data, "split": "train", "num_samples": 200, "batch_size": 100},
        "evaluation": {"dataset": data, "split": "test", "num_samples": 200, "batch_size": 100},
    }))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(config), str(out), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in result.output.splitlines()
            if line.startswith("| ") and not line.startswith("| model")}
    assert float(rows["OT fusion"][0]) > float(rows["vanilla average"][0]) + 40
    card = (out / "README.md").read_text()
    assert "up to 2 sweeps" in card and "activations' similarity on the calibration data" in card
