"""``hf-otfusion align``: every parent written in the target's basis; their plain average is the OT fusion; mergekit
runs on the aligned parents."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from typer.testing import CliRunner

from hf_otfusion.aligned import align_parents
from hf_otfusion.cli import app
from hf_otfusion.config import parse_config
from hf_otfusion.merge import MergeError, merge
from hf_otfusion.testing import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SEEDS = [EXAMPLES / "models" / "mnist-resnet-seed0", EXAMPLES / "models" / "mnist-resnet-seed1"]


def _invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _config(path: Path, models: list[Path], **fields) -> Path:
    path.write_text(yaml.safe_dump({"models": [{"model": str(m)} for m in models], **fields}))
    return path


def _timm_state(folder: Path) -> dict[str, torch.Tensor]:
    return timm.create_model(f"local-dir:{folder}", pretrained=True).state_dict()


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 3.0)], ids=["equal", "1:3"])
def test_aligned_bundled_example_averages_to_the_ot_fusion(tmp_path, weights):
    models = [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(SEEDS, weights, strict=True)]
    config = tmp_path / "weights.yml"
    config.write_text(yaml.safe_dump({"merge_method": "otfusion", "models": models}))
    result = _invoke("align", config, tmp_path / "aligned", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert _invoke("merge", config, tmp_path / "fused", "--device", "cpu", "--quiet").exit_code == 0

    out = tmp_path / "aligned"
    names = ["mnist-resnet-seed0", "mnist-resnet-seed1"]
    assert {p.name for p in out.iterdir()} == {*names, "README.md", "hf_otfusion.yml", "plan.json",
                                               ".hf_otfusion-files.json"}  # the manifest --overwrite reads
    assert not list(out.glob("mergekit-*.yml"))  # mergekit reads transformers checkpoints only
    assert "no mergekit config" in (out / "README.md").read_text()
    aligned = [_timm_state(out / name) for name in names]  # each loads with timm as its own model
    fused = _timm_state(tmp_path / "fused")
    w = [x / sum(weights) for x in weights]
    assert aligned[0].keys() == fused.keys()
    for name, value in fused.items():
        if value.is_floating_point():
            torch.testing.assert_close(w[0] * aligned[0][name] + w[1] * aligned[1][name], value, rtol=0, atol=0,
                                       msg=name)
        else:  # BatchNorm's num_batches_tracked: the target's
            assert torch.equal(aligned[0][name], value), name
    # the target is copied unchanged, the other parent computes its own function in the target's basis
    original = load_file(SEEDS[0] / "model.safetensors")
    assert all(torch.equal(original[k], v) for k, v in load_file(out / names[0] / "model.safetensors").items())
    x = torch.rand(4, 1, 28, 28)
    parent = timm.create_model(f"local-dir:{SEEDS[1]}", pretrained=True).eval()
    moved = timm.create_model(f"local-dir:{out / names[1]}", pretrained=True).eval()
    torch.testing.assert_close(moved(x), parent(x), rtol=1e-4, atol=1e-4)
    assert not torch.equal(aligned[1]["conv1.0.weight"], load_file(SEEDS[1] / "model.safetensors")["conv1.0.weight"])
    card = ModelCard.load(out / names[1] / "README.md")
    assert card.data.library_name == "timm" and "aligned" in card.data.tags
    assert f"basis of the target `{SEEDS[0]}`" in card.text and str(out.resolve() / names[1]) in card.text


def test_activation_alignment_without_repair_averages_to_the_fusion(tmp_path):
    """The bundled example's own config (activations, reset_bn): align leaves the repair out and says so."""
    config = parse_config({
        "models": [{"model": str(p)} for p in SEEDS],
        "parameters": {"alignment": "activations", "repair": "reset_bn"},
        "calibration": {"dataset": str(EXAMPLES / "data" / "mnist"), "num_samples": 64, "batch_size": 32},
    })
    result = align_parents(config, tmp_path / "aligned", progress=False)
    assert any("repair 'reset_bn' is not applied" in note for note in result.notes)
    no_repair = parse_config({**config.model_dump(exclude_unset=True), "parameters": {"alignment": "activations",
                                                                                 "repair": "none"}})
    fused = merge(no_repair, tmp_path / "fused", progress=False, card=False, stream=False).model.state_dict()
    aligned = [m.state_dict() for m in result.models]
    for name, value in fused.items():
        if value.is_floating_point():
            torch.testing.assert_close(0.5 * aligned[0][name] + 0.5 * aligned[1][name], value, rtol=0, atol=0)


def test_align_output_rules(tmp_path):
    config = _config(tmp_path / "c.yml", SEEDS)
    out = tmp_path / "aligned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _invoke("align", config, out, "--quiet")
    assert result.exit_code == 1 and "Error: output folder" in result.output and "--overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    refused = _invoke("align", config, out, "--quiet", "--overwrite")  # not an hf-otfusion output: kept
    assert refused.exit_code == 1 and "keep.txt" in refused.output and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert _invoke("align", config, out, "--quiet").exit_code == 0
    assert _invoke("align", config, out, "--quiet", "--overwrite").exit_code == 0  # its own output is replaced
    assert (out / "mnist-resnet-seed1" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned", "c.yml"]  # no staging folder left

    linear = _config(tmp_path / "linear.yml", SEEDS, merge_method="linear")
    result = _invoke("align", linear, tmp_path / "other")
    assert result.exit_code == 1 and "merge_method 'linear' aligns nothing" in result.output
    assert not (tmp_path / "other").exists()
    with pytest.raises(MergeError, match="aligns nothing"):
        align_parents(parse_config(yaml.safe_load(linear.read_text())), tmp_path / "other")

    # a parent listed twice gets two folders; unused fields are named
    twice = _config(tmp_path / "twice.yml", [SEEDS[0], SEEDS[1], SEEDS[1]],
                    evaluation={"dataset": str(EXAMPLES / "data" / "mnist"), "split": "test"})
    result = _invoke("align", twice, tmp_path / "three")
    assert result.exit_code == 0, result.output
    assert "note: evaluation is not used" in result.output
    assert {p.name for p in (tmp_path / "three").iterdir() if p.is_dir()} == {
        "mnist-resnet-seed0", "mnist-resnet-seed1", "mnist-resnet-seed1-2"}


MERGEKIT = importlib.util.find_spec("mergekit") is not None


def _mergekit(config: Path, out: Path, cwd: Path) -> None:
    """``mergekit-yaml CONFIG OUT`` in a subprocess (run from ``cwd``), with torchvision made importable first as
    ``import hf_otfusion`` does (this environment's torchvision build cannot load its compiled ops)."""
    code = ("import sys; from hf_otfusion._compat import ensure_torchvision_importable; "
            "ensure_torchvision_importable(); from mergekit.scripts.run_yaml import main; sys.exit(main())")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(config), str(out)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not MERGEKIT, reason="mergekit is not installed (pip install mergekit: 0.1.5 installs beside "
                    "torch 2.13 without replacing it)")
def test_mergekit_round_trip_on_aligned_llamas(tmp_path):
    from transformers import AutoModelForCausalLM

    parents = [tiny_llama(tmp_path / "llama-a", seed=0), tiny_llama(tmp_path / "llama-b", seed=1)]
    config = parse_config({"models": [{"model": str(p)} for p in parents]})
    out = tmp_path / "aligned"
    align_parents(config, out, progress=False)
    for name in ("llama-a", "llama-b"):
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {
            p.name for p in (out / name).iterdir()}
    slerp = yaml.safe_load((out / "mergekit-slerp.yml").read_text())
    assert slerp["merge_method"] == "slerp" and slerp["base_model"] == str(out.resolve() / "llama-a")
    assert slerp["parameters"] == {"t": 0.5}

    elsewhere = tmp_path / "elsewhere"  # absolute paths: mergekit runs from any folder
    elsewhere.mkdir()
    _mergekit(out / "mergekit-slerp.yml", tmp_path / "merged-slerp", elsewhere)
    _mergekit(out / "mergekit-linear.yml", tmp_path / "merged-linear", elsewhere)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    for merged in ("merged-slerp", "merged-linear"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / merged).eval()
        assert torch.isfinite(model(input_ids=ids).logits).all()
    # mergekit's linear merge of the aligned parents is the OT fusion of the parents
    fused = merge(config, tmp_path / "fused", progress=False, card=False)
    linear = load_file(tmp_path / "merged-linear" / "model.safetensors")
    assert fused.streamed
    state = load_file(tmp_path / "fused" / "model.safetensors")
    assert state.keys() <= linear.keys()
    for name, value in state.items():
        torch.testing.assert_close(linear[name], value, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("parameters", [{"residual": "orthogonal", "sweeps": 2},
                                        {"alignment": "learned", "head_maps": "orthogonal"}],
                         ids=["residual-orthogonal", "learned"])
def test_align_refuses_maps_that_have_no_basis_to_write(parameters):
    from hf_otfusion.aligned import align_notes

    fields = {"models": [{"model": "a"}, {"model": "b"}], "parameters": parameters}
    if parameters.get("alignment") == "learned":
        fields["calibration"] = {"dataset": "d"}
    with pytest.raises(MergeError, match="use hf-otfusion merge"):
        align_notes(parse_config(fields))
