"""Smoke runs of the tools (scripts/), benchmarks (benchmarks/) and experiments (``python -m experiments``) with tiny
settings: they run end to end and print their tables."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_mnist_mlp_script(tmp_path):
    out = tmp_path / "mnist.md"
    proc = _run("-m", "experiments", "mnist-mlp", "--pairs", "1", "--epochs", "3", "--out", str(out))
    report = out.read_text()
    assert report.strip() == proc.stdout.strip()
    for row in (
        "parents (mean of the two)",
        "vanilla average",
        "prediction ensemble",
        "OT fusion, weights",
        "OT fusion, activations",
        "OT fusion wide → narrow, weights",
    ):
        match = re.search(rf"\| {re.escape(row)}[^|]* \| ([\d.]+) ± ([\d.]+) \|", report)
        assert match, row
        assert 0.0 <= float(match.group(1)) <= 100.0
    # Three epochs of training already lift the parents far above chance.
    parents = float(re.search(r"\| parents \(mean of the two\) \| ([\d.]+)", report).group(1))
    assert parents > 80.0


def test_bench_script_one_case():
    proc = _run("benchmarks/bench_fusion.py", "--cases", "mlpnet", "--modes", "weights", "disk", "disk-activations",
                "--threads", "1")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| MLPNet")]
    # in memory; from disk, traced then with the plan cached, then in activations mode; a phase row for each
    assert len(rows) == 8 and not any("error" in row for row in rows)
    memory = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(memory[3]) > 0 and float(memory[5]) > 0 and float(memory[6]) > 0  # fuse, vanilla, forward (s)
    for row, plan in zip(rows[1:3], ("traced", "cached"), strict=True):
        disk = [c.strip() for c in row.strip("|").split("|")]
        assert disk[2] == plan and float(disk[3]) > 0 and float(disk[4]) > 0 and disk[5].endswith("x")
    activations = [c.strip() for c in rows[3].strip("|").split("|")]
    assert activations[2] == "activations (200 samples)" and float(activations[3]) > 0
    assert [c.strip() for c in rows[6].strip("|").split("|")][1] == "disk (plan cached)"
    assert float([c.strip() for c in rows[7].strip("|").split("|")][4]) > 0  # its calibration phase (s)


def test_bundled_example_parents_have_cards_saying_where_they_came_from(tmp_path):
    """``examples/models/*/README.md``: what ``make_examples.write_model_card`` writes, with the measured accuracy."""
    import importlib.util

    import timm  # conftest imported hf_otfusion first, which makes torchvision importable
    from huggingface_hub import ModelCard

    from hf_otfusion.evaluate import accuracy
    from hf_otfusion.testing import load_mnist_5k

    spec = importlib.util.spec_from_file_location("make_examples", ROOT / "scripts" / "make_examples.py")
    make_examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_examples)
    split = load_mnist_5k()
    summary = (ROOT / "examples" / "README.md").read_text()
    for seed in make_examples.SEEDS:
        folder = ROOT / "examples" / "models" / f"mnist-resnet-seed{seed}"
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "timm" and card.data.pipeline_tag == "image-classification"
        assert "scripts/make_examples.py" in card.text and f"from seed {seed}," in card.text
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        measured = accuracy(model, (make_examples.normalise(split.x_test), split.y_test))
        assert f"Test accuracy on the 1,000 held-out digits: {100 * measured:.1f}%." in card.text
        assert f"seed {seed}: {100 * measured:.1f}%" in summary
        (tmp_path / folder.name).mkdir()
        make_examples.write_model_card(tmp_path / folder.name, seed, measured)
        assert (tmp_path / folder.name / "README.md").read_text() == (folder / "README.md").read_text()


def test_supported_architectures_table_two_families(tmp_path):
    out = tmp_path / "table.md"
    proc = _run("scripts/supported_architectures.py", "--families", "mlp,groupnorm_cnn,llama_gqa", "--out", str(out))
    assert out.read_text().strip() == proc.stdout.strip()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in proc.stdout.splitlines() if line.startswith("| `")}
    assert set(rows) == {"`mlp`", "`groupnorm_cnn`", "`llama_gqa`"}
    for cells in rows.values():
        assert "WRONG" not in cells[-1] and float(cells[-1]) < 1e-4  # the permutation keeps the outputs
        moved, total = (int(n) for n in cells[3].split(" / "))
        assert 0 < moved <= total
    assert rows["`mlp`"][4] == "none" and rows["`mlp`"][5] == "none"
    assert rows["`groupnorm_cnn`"][4] == "none"  # the 2-group GroupNorm's groups are heads: nothing stays fixed
    assert "no permutation allowed" in rows["`llama_gqa`"][4]  # rotary q/k channels stay fixed, with the reason


def test_transformer_experiment_tiny_writes_both_tables(tmp_path):
    """``--tiny``: one seed, a few training steps; the report has the ViT and the causal-LM table, every fusion row
    with a number in each column, and the floors' verdicts."""
    proc = _run("-m", "experiments", "transformers", "--tiny", "--out", str(tmp_path), "--threads", "1", timeout=900)
    report = (tmp_path / "transformers.md").read_text()
    assert report.strip() == proc.stdout.strip()
    assert report.startswith("# ") and "python -m experiments transformers --tiny" in report
    sections = report.split("\n## ")
    vit = next(s for s in sections if s.startswith("ViT"))
    lm = next(s for s in sections if s.startswith("Causal LM"))
    assert "| model | test accuracy (%) | gap closed (%) | fusion time (s) |" in vit
    assert "| model | test loss (nats/token) | perplexity | loss gap closed (%) | fusion time (s) |" in lm
    fused = ("OT (weights)", "OT (activations)", "OT (activations, standardized)", "OT (activations) + REPAIR",
             "OT (weights) + refit", "OT (activations) + refit", "OT (activations, standardized) + refit",
             "OT (weights, Sinkhorn reg 0.05)", "OT (weights, Sinkhorn reg 0.05) + refit",
             "RegMean (OT activations, parents' Gram matrices)", "vanilla + refit (no alignment)")
    number = r"-?[\d.]+ ± [\d.]+"
    for section, columns in ((vit, 3), (lm, 4)):
        for row in ("vanilla average", *fused):
            assert re.search(rf"^\| {re.escape(row)} \|" + rf" {number} \|" * columns + "$", section, re.M), row
        assert re.search(rf"^\| ensemble \| {number} \|.* 100\.00 ± 0\.00 \| - \|$", section, re.M)
        for row in ("vanilla average + fine-tune", "OT (activations) + refit + fine-tune"):  # no fusion time
            assert re.search(rf"^\| {re.escape(row)} \|" + rf" {number} \|" * (columns - 1) + r" - \|$", section,
                             re.M), row
    assert "A short fine-tune (the only gradient steps in the table)" in report
    uniform = math.log(256)
    loss = float(re.search(r"^\| parents \(mean\) \| ([\d.]+) ±", lm, re.M).group(1))
    assert 0 < loss < uniform  # a few steps already beat a uniform guess over the bytes
    shows = report.split("## What the run shows")[1]
    assert "≥ 92% of the accuracy gap" in shows and "≥ 80% of the loss gap" in shows


def _stream_experiment():
    """The stream experiment's module (``python -m experiments stream``)."""
    from experiments import stream

    return stream


def _random_llama():
    """A seeded float64 grouped-query Llama (hidden 16, 2 layers) with every parameter random (norm gains around 1),
    and a batch of token ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return model, torch.randint(0, 50, (3, 12))


def test_orthogonal_stream_map_keeps_a_randomised_llama_and_moves_every_stream_tensor():
    """The experiment's orthogonal stream map is exact: with every parameter random (RMSNorm gains included, which
    must be folded into their readers first) the rotated decoder keeps its logits, and every tensor touching the stream
    moved. Without the fold, the same rotation changes the function (the check can fail)."""
    se = _stream_experiment()
    torch = se.torch
    model, ids = _random_llama()
    q = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        folded = se.fold_norms(model)
        rotated = se.rotate_stream(folded, q)
        assert torch.allclose(folded(input_ids=ids).logits, before, atol=1e-10)
        # transformers' RMSNorm normalises in float32 even for a float64 model: equal to about 1e-6
        assert torch.allclose(rotated(input_ids=ids).logits, before, atol=1e-4)
        assert not torch.allclose(se.rotate_stream(model, q)(input_ids=ids).logits, before, atol=1e-1)
    moved = {k for k, v in rotated.state_dict().items() if not torch.allclose(v, folded.state_dict()[k])}
    stream = {k for k in folded.state_dict() if any(p in k for p in ("embed", "proj", "lm_head"))}
    assert moved == stream
    # Procrustes recovers a rotation exactly
    rows = torch.randn(40, 16, dtype=torch.float64)
    assert torch.allclose(se.procrustes(rows @ q.T, rows), q, atol=1e-10)


def test_stream_experiment_tiny_writes_its_table(tmp_path):
    proc = _run("-m", "experiments", "stream", "--tiny", "--out", str(tmp_path), "--threads", "1")
    report = (tmp_path / "stream.md").read_text()
    assert report.strip() == proc.stdout.strip()
    number = r"-?[\d.]+ ± [\d.]+"
    for name, _ in _stream_experiment().ROWS:
        assert re.search(rf"^\| {re.escape(name)} \| [^|]+ \| {number} \| {number} \|$", report, re.M), name
    assert re.search(rf"after the OT permutation {number}, after the orthogonal map {number}", report)


def test_glmc_maps_keep_a_randomised_llama_and_the_weights_alignment_recovers_them(monkeypatch):
    """The glmc experiment's maps (``python -m experiments glmc``) are exact: a random orthogonal stream map, random
    key/value group and query head permutations, value-space orthogonal maps, rotary-pair rotations and scales, MLP
    neuron permutations and signs keep a randomised, norm-folded Llama's logits in float64 (RMSNorm computed in
    float64 here: transformers' own normalises in float32). The data-free alignment of the model with its carried
    copy then recovers every map (the carried-back copy equals the model), while without the within-head maps, signs
    and scales it cannot."""
    from transformers.models.llama import modeling_llama

    from experiments import glmc as ge
    np, torch = ge.np, ge.torch

    def rms64(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms64)
    model, ids = _random_llama()
    folded = ge.fold_norms(model)
    maps = ge.identity_maps(folded)
    gen = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(0)
    maps.q = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=gen))[0]
    for lm in maps.layers:
        lm.groups = rng.permutation(2)
        lm.heads = np.concatenate([lm.groups[g] * 2 + rng.permutation(2) for g in range(2)])
        lm.neurons = rng.permutation(24)
        sign = torch.where(torch.rand(24, generator=gen) < 0.5, -1.0, 1.0).double()
        lm.signs = sign * (torch.rand(24, generator=gen, dtype=torch.float64) + 0.5)
        lm.vo = torch.linalg.qr(torch.randn(2, 4, 4, dtype=torch.float64, generator=gen))[0]
        lm.vo_scale = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
        phi = torch.rand(2, 2, generator=gen, dtype=torch.float64) * 6.28
        lm.qk = torch.stack([torch.stack([phi.cos(), -phi.sin()], -1), torch.stack([phi.sin(), phi.cos()], -1)], -2)
        lm.qk_scale = torch.rand(2, 2, generator=gen, dtype=torch.float64) + 0.5
    carried = ge.carry(folded, maps)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert torch.allclose(carried(input_ids=ids).logits, before, atol=1e-10)
        broken = _copy_with_one_scale_wrong(ge, folded, maps)
        assert not torch.allclose(broken(input_ids=ids).logits, before, atol=1e-3)
    moved = {k for k, v in carried.state_dict().items() if not torch.allclose(v, folded.state_dict()[k])}
    assert moved == {k for k in folded.state_dict() if any(p in k for p in ("embed", "proj", "lm_head"))}
    assert ge.weight_distance(folded, carried) > 0.5
    full = ge.Options(vo=True, qk=True, qk_scale=True, vo_scale=True, signs=True, mlp_scale=True)
    found, _ = ge.align(folded, carried, full)
    assert ge.weight_distance(folded, ge.carry(carried, found)) < 1e-5
    found, _ = ge.align(folded, carried, ge.Options())
    assert ge.weight_distance(folded, ge.carry(carried, found)) > 0.1


def _copy_with_one_scale_wrong(ge, folded, maps):
    """``maps`` with the key's scale of one rotary pair not undone (the query scaled, the key not): must not keep."""
    import copy

    wrong = copy.deepcopy(maps)
    wrong.layers[0].qk_scale[0, 0] = 3.0
    carried = ge.carry(folded, maps)
    bad = ge.carry(folded, wrong)
    state = bad.state_dict()
    key = "model.layers.0.self_attn.k_proj.weight"
    state[key] = carried.state_dict()[key]  # the key as in the exact map, the query scaled by 3
    bad.load_state_dict(state)
    return bad
