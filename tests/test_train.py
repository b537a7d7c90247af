"""The seeded training loop: real learning on real MNIST, determinism, argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_otfusion import finetune
from hf_otfusion.evaluate import accuracy
from hf_otfusion.testing import load_mnist_5k
from hf_otfusion.train import train_classifier


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_5k()


def test_trained_mlp_beats_85_percent(mnist):
    model = train_classifier(_mlp(0), mnist.x_train, mnist.y_train, epochs=4, lr=1e-3, batch_size=64, seed=0)
    assert not model.training
    assert accuracy(_mlp(0), (mnist.x_test, mnist.y_test)) < 0.3  # untrained: near chance
    assert accuracy(model, (mnist.x_test, mnist.y_test)) > 0.85


def test_training_is_deterministic_and_seeded(mnist):
    x, y = mnist.x_train[:512], mnist.y_train[:512]

    def run(seed: int, optimizer: str = "adam") -> dict[str, torch.Tensor]:
        model = train_classifier(
            _mlp(1),
            x,
            y,
            epochs=1,
            lr=1e-2 if optimizer == "sgd" else 1e-3,
            batch_size=32,
            seed=seed,
            optimizer=optimizer,
        )
        return model.state_dict()

    first, second, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    sgd = run(0, "sgd")
    assert not all(torch.equal(first[k], sgd[k]) for k in first)


def test_zero_epochs_leaves_weights_unchanged(mnist):
    model = _mlp(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_classifier(model, mnist.x_train[:64], mnist.y_train[:64], epochs=0, lr=1e-3, batch_size=8, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_arguments():
    x, y = torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="differ in length"):
        train_classifier(_mlp(0), x, y[:3], epochs=1, lr=1e-3, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="optimizer"):
        train_classifier(_mlp(0), x, y, epochs=1, lr=1e-3, batch_size=2, seed=0, optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr"):
        train_classifier(_mlp(0), x, y, epochs=1, lr=0.0, batch_size=2, seed=0)


# ----------------------------------------------------------------------------------------------------------
# finetune


def _mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return nn.functional.cross_entropy(model.eval()(x), y).item()


def test_finetune_is_a_deterministic_copy_that_lowers_the_loss(mnist):
    x, y = mnist.x_train[::8], mnist.y_train[::8]  # 500 images of every class
    model = _mlp(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = finetune(model, (x, y), steps=30, lr=0.05, seed=1, progress=False)
    again = finetune(model, (x, y), steps=30, lr=0.05, seed=1, progress=False)
    other = finetune(model, (x, y), steps=30, lr=0.05, seed=2, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input is untouched
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in tuned.state_dict().items())
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in tuned.state_dict().items())
    assert _mean_loss(tuned, x, y) < 0.7 * _mean_loss(model, x, y)
    assert not tuned.training
    adam = finetune(model, (x, y), steps=30, lr=1e-3, optimizer="adam", progress=False)
    assert _mean_loss(adam, x, y) < _mean_loss(model, x, y)
    same = finetune(model, (x, y), steps=0, lr=0.1, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in same.state_dict().items())


class _Keyword(nn.Module):
    """A transformers-like model: keyword inputs, an output with ``.logits``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask=None):
        return SequenceClassifierOutput(logits=self.lin(input_ids.float() * attention_mask))


def test_finetune_on_batches_of_dict_inputs():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randn(60, 4, generator=gen)
    y = ids[:, :3].argmax(1)
    batches = [({"input_ids": ids[i : i + 20], "attention_mask": torch.ones(20, 4)}, y[i : i + 20])
               for i in range(0, 60, 20)]
    torch.manual_seed(0)
    model = _Keyword()
    tuned = finetune(model, batches, steps=20, lr=0.1, progress=False)  # cycles the 3 batches
    with torch.no_grad():
        before = nn.functional.cross_entropy(model(ids, torch.ones(60, 4)).logits, y)
        after = nn.functional.cross_entropy(tuned(ids, torch.ones(60, 4)).logits, y)
    assert after < before


def test_finetune_bad_arguments():
    x, y = torch.randn(8, 784), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="steps >= 0, lr > 0"):
        finetune(_mlp(0), (x, y), steps=-1, lr=0.1)
    with pytest.raises(ValueError, match="steps >= 0, lr > 0"):
        finetune(_mlp(0), (x, y), steps=1, lr=0)
    with pytest.raises(ValueError, match="optimizer must be"):
        finetune(_mlp(0), (x, y), steps=1, lr=0.1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="differ in length"):
        finetune(_mlp(0), (x, y[:4]), steps=1, lr=0.1)
    with pytest.raises(ValueError, match="no samples"):
        finetune(_mlp(0), [], steps=1, lr=0.1, progress=False)
