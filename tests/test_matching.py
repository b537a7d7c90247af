"""Weight matching by coordinate descent (``fuse(..., sweeps=N)``, ``hf_otfusion.matching``)."""

import pytest
import torch
from torch import nn
from zoo import make, run

from hf_otfusion import FusionError, build_plan, fuse
from hf_otfusion.config import ConfigError, parse_config
from hf_otfusion.matching import recording, weight_matching, weight_similarity
from hf_otfusion.train import train_classifier

FAMILIES = ["mlp", "resnet_basic", "hf_vit_sdpa", "llama_gqa"]  # MLP, BN ResNet, ViT (heads), GQA decoder


def _assert_same(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def _non_decreasing(values: list[float]) -> bool:
    return all(b >= a - 1e-9 * abs(a) for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("name", ["resnet_basic", "timm_vit", "hf_bert_sdpa", "llama_gqa", "qwen3_moe"])
def test_sweeps_on_activations_carry_the_other_model_and_match_a_permuted_copy(family, other, one_thread, name):
    """Weight matching that counts the activations: ``weights=[0, 1]`` computes B (a copy of the target could not),
    and a permuted copy of A fuses back into A; the objective never falls."""
    model, x, plan, permuted = family(name)
    b, shuffled = other(name)
    calibration = [x]
    with recording() as results:
        carried = fuse([model, shuffled], weights=[0, 1], alignment="activations", calibration=calibration,
                       example_input=x, plan=plan, sweeps=2, progress=False)
        back = fuse([model, permuted], alignment="activations", calibration=calibration, example_input=x, plan=plan,
                    sweeps=2, progress=False)
    with torch.no_grad():
        _assert_same(run(carried, x), run(b, x))
        _assert_same(run(back, x), run(model, x))
    assert all(_non_decreasing(r.objective) for r in results)


@pytest.mark.parametrize("name", FAMILIES)
def test_sweeps_recover_a_permuted_copy_and_keep_the_target_function(family, one_thread, name):
    model, x, plan, permuted = family(name)
    with recording() as results:
        fused = fuse([model, permuted], example_input=x, plan=plan, sweeps=3, progress=False)
    with torch.no_grad():
        _assert_same(run(fused, x), run(model, x))
    assert len(results) == 1 and _non_decreasing(results[0].objective)
    other, _ = make(name, seed=3)
    with recording() as results:
        as_b = fuse([model, other], weights=[0, 1], example_input=x, sweeps=3, progress=False)
    with torch.no_grad():
        _assert_same(run(as_b, x), run(other, x))
    assert _non_decreasing(results[0].objective) and len(results[0].objective) >= 2


@pytest.mark.parametrize("name", FAMILIES)
def test_descent_alone_undoes_a_random_permutation(family, one_thread, name):
    """From the identity (no single pass), coordinate descent finds every space's permutation, heads included."""
    model, x, plan, permuted = family(name)
    target = model.state_dict()
    out, result = weight_matching(permuted.state_dict(), target, plan, sweeps=10)
    for key in out:
        torch.testing.assert_close(out[key], target[key], rtol=0, atol=0)
    assert result.converged and _non_decreasing(result.objective)
    assert result.objective[-1] > result.objective[0]
    assert result.objective[-1] == pytest.approx(weight_similarity(target, target, plan), rel=1e-9)


def test_three_models_each_matched_to_the_target(family, one_thread):
    model, x, plan, permuted = family("resnet_basic")
    other, _ = make("resnet_basic", seed=4)
    with recording() as results:
        fused = fuse([model, permuted, other], weights=[1, 0, 0], example_input=x, sweeps=2, progress=False)
    with torch.no_grad():
        _assert_same(run(fused, x), run(model, x))
    assert len(results) == 2 and all(_non_decreasing(r.objective) for r in results)


def test_sweeps_raise_the_weight_similarity_of_trained_mlps(one_thread):
    from sklearn.datasets import load_digits

    data = load_digits()
    xs = torch.tensor(data.data, dtype=torch.float32) / 16.0
    ys = torch.tensor(data.target)
    parents = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        parents.append(train_classifier(net, xs, ys, epochs=3, lr=1e-2, batch_size=64, seed=seed))
    plan = build_plan(parents[0], xs[:2])
    target = parents[0].state_dict()
    similarity = {}
    for sweeps in (0, 5):
        with recording() as results:
            aligned = fuse(parents, weights=[0, 1], plan=plan, sweeps=sweeps, progress=False)
        similarity[sweeps] = weight_similarity(aligned.state_dict(), target, plan)
        with torch.no_grad():  # still parent 1's function
            torch.testing.assert_close(aligned(xs[:50]), parents[1](xs[:50]), rtol=1e-4, atol=1e-4)
    assert results[0].objective[0] == pytest.approx(similarity[0], rel=1e-9)
    assert results[0].objective[-1] == pytest.approx(similarity[5], rel=1e-9)
    assert similarity[5] > similarity[0]


def test_sweeps_refuse_what_is_not_a_permutation(family):
    model, x, plan, permuted = family("mlp")
    for kwargs, match in [({"sweeps": -1}, "sweeps must be an integer >= 0"),
                          ({"sweeps": 1.5}, "sweeps must be an integer"),
                          ({"sweeps": 2, "solver": "sinkhorn"}, "needs solver='emd'"),
                          ({"sweeps": 2, "marginals": "importance"}, "needs marginals='uniform'")]:
        with pytest.raises(FusionError, match=match):
            fuse([model, permuted], example_input=x, progress=False, **kwargs)
    narrow = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))
    wide = nn.Sequential(nn.Linear(20, 24), nn.ReLU(), nn.Linear(24, 5))
    with pytest.raises(FusionError, match="needs the target's widths"):
        fuse([narrow, wide], example_input=torch.randn(2, 20), sweeps=1, progress=False)
    fuse([narrow, wide], example_input=torch.randn(2, 20), sweeps=0, progress=False)  # the single pass still works


def test_config_sweeps_field():
    two = [{"model": "a"}, {"model": "b"}]
    assert parse_config({"models": two}).fusion_parameters.sweeps == 0
    assert parse_config({"models": two, "parameters": {"sweeps": 5}}).fusion_parameters.sweeps == 5
    with pytest.raises(ConfigError, match="parameters.sweeps"):
        parse_config({"models": two, "parameters": {"sweeps": -1}})


def test_card_names_the_sweeps():
    from hf_otfusion.card import _fusion_options

    two = [{"model": "a"}, {"model": "b"}]
    rows = dict(_fusion_options(parse_config({"models": two, "parameters": {"sweeps": 4}})))
    assert "up to 4 sweeps" in rows["weight matching"] and "activations" not in rows["weight matching"]
    on_activations = parse_config({"models": two, "parameters": {"sweeps": 2, "alignment": "activations"},
                                   "calibration": {"dataset": "org/digits"}})
    assert "activations' similarity" in dict(_fusion_options(on_activations))["weight matching"]
    assert "weight matching" not in dict(_fusion_options(parse_config({"models": two})))


def test_evidence_of_a_space_enters_its_solve_and_the_objective():
    """Two unrelated MLPs; ``evidence`` that prefers one assignment of the hidden units: weight matching follows
    it (it is scaled to the weights' similarity, and a permutation's trace beats the weights' noise), and the
    objective is the weights' similarity plus the evidence's trace after the map."""
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)) for _ in range(2))
    x = torch.randn(2, 6)
    plan = build_plan(b, x)
    (space,) = plan.spaces
    state, target = a.state_dict(), b.state_dict()
    wanted = torch.randperm(12, generator=torch.Generator().manual_seed(1))  # target unit j <- unit wanted[j]
    evidence = torch.zeros(12, 12, dtype=torch.float64)
    evidence[wanted, torch.arange(12)] = 1.0
    plain, plain_result = weight_matching(state, target, plan, sweeps=3)
    moved, result = weight_matching(state, target, plan, sweeps=3, evidence={space.name: evidence})
    assert torch.equal(result.perms[space.name], wanted)
    assert not torch.equal(plain_result.perms[space.name], wanted)  # the weights alone choose otherwise
    assert torch.equal(moved["0.weight"], state["0.weight"][wanted])
    weights = sum(state[t].double().reshape(12, -1) @ target[t].double().reshape(12, -1).T
                  for t in ("0.weight", "0.bias")) + state["2.weight"].double().T @ target["2.weight"].double()
    scale = float(weights.norm() / evidence.norm())  # the evidence counts as much as the weights
    start = weight_similarity(state, target, plan) + scale * float(evidence.trace())
    assert result.objective[0] == pytest.approx(start, rel=1e-6)
    assert result.objective[-1] == pytest.approx(weight_similarity(moved, target, plan) + scale * 12, rel=1e-6)
    with pytest.raises(FusionError, match="evidence for space"):
        weight_matching(state, target, plan, sweeps=1, evidence={space.name: torch.zeros(3, 3)})
