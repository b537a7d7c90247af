"""The learned alignment of ``python -m experiments glmc-learned``: its parametrised maps keep a randomised Llama's
function for any value of the parameters, and a few training steps on the maps lower KL(ensemble || fused)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from experiments import glmc
from experiments import glmc_learned as gl


def _rms64(self, x):
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def _llama(seed: int) -> LlamaForCausalLM:
    """A seeded float64 grouped-query Llama (hidden 16, 2 layers) with every parameter random (norm gains around 1)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return model


def _random_maps(folded: torch.nn.Module) -> glmc.Maps:
    """Random maps of the symmetry class: stream rotation, group/head/neuron permutations, signs, value maps, rotary
    rotations and scales."""
    maps = glmc.identity_maps(folded)
    gen = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(0)
    maps.q = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=gen))[0]
    for lm in maps.layers:
        lm.groups = rng.permutation(2)
        lm.heads = np.concatenate([lm.groups[g] * 2 + rng.permutation(2) for g in range(2)])
        lm.neurons = rng.permutation(24)
        lm.signs = torch.where(torch.rand(24, generator=gen) < 0.5, -1.0, 1.0).double()
        lm.vo = torch.linalg.qr(torch.randn(2, 4, 4, dtype=torch.float64, generator=gen))[0]
        lm.qk = gl.rotation(torch.rand(2, 2, generator=gen, dtype=torch.float64) * 6.28)
        lm.qk_scale = torch.rand(2, 2, generator=gen, dtype=torch.float64) + 0.5
    return maps


@pytest.mark.parametrize("invertible", [False, True])
def test_learned_maps_keep_a_randomised_llama_for_any_parameters(monkeypatch, invertible):
    """Random parameters of ``LearnedMaps`` around random initial maps: the carried model's float64 logits equal the
    model's at 1e-8 (RMSNorm in float64 here: transformers' own normalises in float32), every stream matrix moved
    from the initial maps' carry, and a wrong inverse (the output projection not carried) breaks the function."""
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms64)
    model = _llama(0)
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(2))
    folded = gl.fold_norms(model)
    init = _random_maps(folded)
    learned = gl.LearnedMaps(init, invertible)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in learned.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    maps = learned.detached()
    assert torch.allclose(maps.q.T @ maps.q, torch.eye(16, dtype=torch.float64), atol=1e-12)
    vo = maps.layers[0].vo
    off = (vo.transpose(-1, -2) @ vo - torch.eye(4, dtype=torch.float64)).abs().max()
    assert off > 1e-3 if invertible else off < 1e-12  # any value map, or an orthogonal one
    carried = glmc.carry(folded, maps)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert (carried(input_ids=ids).logits - before).abs().max() < 1e-8
        state = carried.state_dict()
        key = "model.layers.0.self_attn.o_proj.weight"
        state[key] = glmc.carry(folded, init).state_dict()[key]
        carried.load_state_dict(state)
        assert not torch.allclose(carried(input_ids=ids).logits, before, atol=1e-3)
    start = glmc.carry(folded, init).state_dict()
    moved = {k for k, v in glmc.carry(folded, maps).state_dict().items() if not torch.allclose(v, start[k])}
    assert moved == {k for k in folded.state_dict() if any(p in k for p in ("embed", "proj", "lm_head"))}


def test_a_few_training_steps_lower_the_kl_to_the_ensemble_and_leave_the_weights():
    """Two random Llamas: the weights alignment's maps, then 15 steps of Adam on the maps lower the KL of the fused
    model (lam = 0.5) to the ensemble on the calibration sequences; the parents' weights are not touched."""
    a, b = _llama(0), _llama(1)
    fa, fb = gl.fold_norms(a), gl.fold_norms(b)
    ids = torch.randint(0, 50, (16, 12), generator=torch.Generator().manual_seed(2))
    init, _ = glmc.align(fa, fb, glmc.Options(rounds=2, vo=True, qk=True, qk_scale=True, signs=True))
    objective = gl.Objective(fa, fb, ids, gl.ensemble_logp(a, b, ids))
    frozen = {k: v.clone() for k, v in fb.state_dict().items()}
    assert not any(p.requires_grad for p in objective.module.parameters())
    for invertible in (False, True):
        run = gl.train(objective, init, steps=15, lr=1e-2, batch=8, seed=0, invertible=invertible)
        assert run.kl_before == pytest.approx(objective.full_kl(init))
        assert run.kl_after < 0.9 * run.kl_before, (invertible, run.kl_before, run.kl_after)
    assert all(torch.equal(v, frozen[k]) for k, v in fb.state_dict().items())


def test_the_experiment_runs_tiny_and_writes_its_table(tmp_path):
    """``python -m experiments glmc-learned --tiny``: one seed, a one-layer LM, a few steps; every row in the table."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "experiments", "glmc-learned", "--tiny", "--steps", "3", "--sweep",
                           "--out", str(tmp_path), "--threads", "1"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "glmc_learned.md").read_text()
    assert report.strip() == proc.stdout.strip()
    number = r"-?[\d.]+ ± [\d.]+"
    for base in ("data-free maps (glmc best)", *gl.LEARNED):
        for suffix in ("", " + refit", " + refit, stream target"):
            row = re.escape(base + suffix)
            assert re.search(rf"^\| {row} \| {number} \| {number} \| {number} \| {number} \|$", report, re.M), row
    assert "[seed 0, learned maps: step 3/3: KL" in proc.stderr
