"""Mixtures of experts: whole experts move with their router rows, each expert's hidden neurons inside it.

Every entry of each model's state dict is random (norm gains and biases too), so a wrong plan changes the outputs.
The models run in float64, but their routers take a softmax in float32 (transformers casts the router's logits),
so a permutation, which sums the residual stream in another order, changes the outputs by float32 round-off there:
tolerances are ~1e-5 relative, where a wrong plan changes them by order one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import make, randomize_state, run

from hf_otfusion import build_plan, fuse, random_permutation
from hf_otfusion.plan import AlignmentPlan, Space

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = ["mixtral_moe", "qwen2_moe_shared", "qwen3_moe", "olmoe"]
LAYER = "model.layers.0.mlp"
_CACHE: dict[str, tuple] = {}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def _family(name: str) -> tuple[nn.Module, dict, AlignmentPlan, nn.Module]:
    if name not in _CACHE:
        model, x = make(name)
        model = model.double()
        plan = build_plan(model, x)
        _CACHE[name] = (model, x, plan, random_permutation(model, plan, seed=1))
    return _CACHE[name]


def _space_of(plan: AlignmentPlan, tensor: str, axis: int) -> Space:
    return next(s for s in plan.spaces if any(m.tensor == tensor and m.axis == axis for m in s.members))


def _router(model: nn.Module) -> str:
    return f"{LAYER}.router.weight" if f"{LAYER}.router.weight" in model.state_dict() else f"{LAYER}.gate.weight"


def _expert_order(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """For each expert of ``after``, the expert of ``before`` it holds (its entries, in any order)."""
    keys = [torch.sort(e.flatten()).values for e in before]
    return [next(f for f, k in enumerate(keys) if torch.equal(torch.sort(e.flatten()).values, k)) for e in after]


def _row_order(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """For each row of ``after`` (one expert's hidden neuron), the row of ``before`` it is (its entries, any order)."""
    keys = [torch.sort(r).values for r in before]
    return [next(i for i, k in enumerate(keys) if torch.equal(torch.sort(r).values, k)) for r in after]


@pytest.mark.parametrize("name", EXACT)
def test_experts_move_as_blocks_with_their_router_rows(name):
    model, x, plan, permuted = _family(name)
    assert not plan.unhandled
    plan.check_strict()  # nothing left fixed but rotary q/k channels, which no permutation may move
    with torch.no_grad():
        assert _rel(run(permuted, x), run(model, x)) < 1e-5
    experts = _space_of(plan, f"{LAYER}.experts.gate_up_proj", 1)
    router = _space_of(plan, _router(model), 0)
    n = model.config.num_local_experts if hasattr(model.config, "num_local_experts") else model.config.num_experts
    assert experts.heads == router.heads == n and experts.head_group == router.head_group is not None
    assert {(m.tensor.rsplit(".", 1)[1], m.axis, m.head_axis) for m in experts.members} == {
        ("gate_up_proj", 1, 0), ("down_proj", 2, 0)}
    assert all(m.head_axis is None for s in plan.spaces if s is not experts for m in s.members
               if m.tensor.startswith(f"{LAYER}.experts."))  # the expert axis moves once, with the hidden neurons
    state, moved = model.state_dict(), permuted.state_dict()
    gate_up, down = state[f"{LAYER}.experts.gate_up_proj"], state[f"{LAYER}.experts.down_proj"]
    order = _expert_order(gate_up, moved[f"{LAYER}.experts.gate_up_proj"])
    assert order != list(range(n)), "the experts kept their order"
    assert order == _expert_order(down, moved[f"{LAYER}.experts.down_proj"])
    rows = _row_order(state[_router(model)], moved[_router(model)])
    assert rows == order, "the router rows did not move with their experts"
    half = gate_up.shape[1] // 2
    inside = [_row_order(gate_up[f, :half], moved[f"{LAYER}.experts.gate_up_proj"][e, :half])
              for e, f in enumerate(order)]
    assert len({tuple(o) for o in inside}) == n, "the experts' hidden neurons moved alike (one shared map)"
    for e, f in enumerate(order):  # gate and up rows, and the down projection's columns, move alike in an expert
        assert _row_order(gate_up[f, half:], moved[f"{LAYER}.experts.gate_up_proj"][e, half:]) == inside[e]
        assert _row_order(down[f].T, moved[f"{LAYER}.experts.down_proj"][e].T) == inside[e]


@pytest.mark.parametrize("name", EXACT)
def test_the_other_mixture_arrives_in_the_targets_basis(name):
    model, x, plan, _ = _family(name)
    other = randomize_state(make(name)[0], seed=11).double()
    shuffled = random_permutation(other, plan, seed=5)
    with torch.no_grad():
        fused = fuse([model, shuffled], weights=[0, 1], plan=plan, progress=False)
        assert _rel(run(fused, x), run(other, x)) < 1e-5
        both = fuse([model, other], plan=plan, progress=False)
        again = fuse([model, shuffled], plan=plan, progress=False)
        for key, value in both.state_dict().items():
            torch.testing.assert_close(again.state_dict()[key], value, rtol=1e-9, atol=1e-12)
        assert _rel(run(both, x), run(model, x)) > 1e-2  # and the average is not the target


def test_activations_match_experts_by_their_routing():
    model, x, plan, _ = _family("mixtral_moe")
    other = randomize_state(make("mixtral_moe")[0], seed=11).double()
    shuffled = random_permutation(other, plan, seed=5)
    with torch.no_grad():
        both = fuse([model, other], alignment="activations", calibration=x, plan=plan, progress=False)
        again = fuse([model, shuffled], alignment="activations", calibration=x, plan=plan, progress=False)
        for key, value in both.state_dict().items():
            torch.testing.assert_close(again.state_dict()[key], value, rtol=1e-9, atol=1e-12)
        fused = fuse([model, shuffled], weights=[0, 1], alignment="activations", calibration=x, plan=plan,
                     progress=False)
        assert _rel(run(fused, x), run(other, x)) < 1e-5


def test_gpt_oss_moves_whole_experts_and_keeps_its_interleaved_neurons():
    model, x, plan, permuted = _family("gpt_oss")
    with torch.no_grad():
        assert _rel(run(permuted, x), run(model, x)) < 1e-5
    router = _space_of(plan, f"{LAYER}.router.weight", 0)
    assert router.heads == 4 and router.head_group is not None
    assert {m.tensor.rsplit(".", 1)[1] for m in router.members} >= {
        "weight", "bias", "gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}
    fixed = next(f for f in plan.fixed if f"{LAYER}.experts.gate_up_proj:2" in f.members)
    assert "step 2" in fixed.reason and not fixed.necessary
    state, moved = model.state_dict(), permuted.state_dict()
    order = _expert_order(state[f"{LAYER}.experts.gate_up_proj"], moved[f"{LAYER}.experts.gate_up_proj"])
    assert order != list(range(4)) and _row_order(state[f"{LAYER}.router.weight"], moved[f"{LAYER}.router.weight"]) \
        == order
    other = randomize_state(make("gpt_oss")[0], seed=11).double()
    with torch.no_grad():
        fused = fuse([model, random_permutation(other, plan, seed=5)], weights=[0, 1], plan=plan, progress=False)
        assert _rel(run(fused, x), run(other, x)) < 1e-5


class _Routed(nn.Module):
    """A router's top-1 choice reads a per-expert table, directly or after arithmetic on the indices."""

    def __init__(self, shift: bool):
        super().__init__()
        self.inp, self.router, self.out = nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(8, 3)
        self.table = nn.Parameter(torch.randn(4, 8))
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        index = self.router(h).topk(1, dim=-1).indices[:, 0]
        if self.shift:
            index = (index + 1) % 4
        return self.out(h + self.table[index])


def test_expert_indices_read_in_an_unfollowed_way_fix_the_experts():
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    for shift in (False, True):
        model = _Routed(shift)
        plan = build_plan(model, x)
        router = [s for s in plan.spaces if any(m.tensor == "router.weight" and m.axis == 0 for m in s.members)]
        if shift:  # arithmetic on the indices: the experts stay in place
            assert not router
            assert any("router.weight:0" in f.members and "read by op 'add'" in f.reason for f in plan.fixed)
        else:  # the table's rows move with the router's
            assert {(m.tensor, m.axis) for m in router[0].members} == {("router.weight", 0), ("router.bias", 0),
                                                                      ("table", 0)}
        with torch.no_grad():
            torch.testing.assert_close(random_permutation(model, plan, seed=2)(x), model(x))


def test_merge_of_two_trained_mixtral_checkpoints_reports_perplexity(tmp_path):
    """`hf-otfusion merge` of two tiny mixture-of-experts LMs trained from different seeds on real text (the
    standard library's source): exit 0, the perplexity table, and the fused model below the vanilla average."""
    import re

    import yaml
    from typer.testing import CliRunner

    from hf_otfusion.cli import app
    from hf_otfusion.config import DatasetConfig
    from hf_otfusion.data import load_split
    from hf_otfusion.testing import stdlib_text_dataset, tiny_mixtral

    data = stdlib_text_dataset(tmp_path / "text", length=48, num_train=192, num_test=48)
    train = list(load_split(DatasetConfig(dataset=str(data), split="train"))["text"])
    parents = [tiny_mixtral(tmp_path / f"mixtral-seed{s}", seed=s, train_on=train, steps=120) for s in (0, 1)]
    config = tmp_path / "moe.yml"
    config.write_text(yaml.safe_dump({
        "models": [{"model": str(p)} for p in parents], "parameters": {"alignment": "weights"},
        "evaluation": {"dataset": str(data), "split": "test", "batch_size": 16}}))
    result = CliRunner().invoke(app, ["merge", str(config), str(tmp_path / "fused"), "-q"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout
    losses = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and re.fullmatch(r"[0-9.]+", cells[1]):
            losses[cells[0]] = float(cells[1])
    vanilla = next(v for k, v in losses.items() if "vanilla" in k)
    assert losses["OT fusion"] < vanilla, losses
