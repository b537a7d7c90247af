"""Evaluation helpers on hand-made models whose predictions are known in advance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_otfusion.data import make_loader
from hf_otfusion.evaluate import EvalRow, accuracy, agreement, evaluate_fusion, format_table, logits_of, loss


def _constant(probs: list[float]) -> nn.Linear:
    """A model ignoring its input (2 features) whose softmax output is always ``probs``."""
    model = nn.Linear(2, len(probs))
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.log(torch.tensor(probs)))
    return model


# Four samples: three of class 0, one of class 1.
X = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 0, 1, 0])
A = [0.9, 0.1]  # parent A always predicts class 0
B = [0.3, 0.7]  # parent B always predicts class 1


def test_accuracy_and_loss_of_a_constant_model():
    model = _constant(A)
    assert accuracy(model, (X, Y)) == pytest.approx(0.75)
    assert loss(model, (X, Y)) == pytest.approx(-(3 * math.log(0.9) + math.log(0.1)) / 4, rel=1e-6)
    # Same numbers from a DataLoader with ragged batches.
    loader = make_loader(X, Y, batch_size=3)
    assert accuracy(model, loader) == pytest.approx(0.75)
    assert loss(model, loader) == pytest.approx(loss(model, (X, Y)), rel=1e-6)


def test_argmax_accuracy_of_an_input_dependent_model():
    x = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [1.0, 4.0], [0.5, 0.2]])
    y = torch.tensor([0, 1, 1, 1, 1])
    identity = nn.Linear(2, 2)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(2))
        identity.bias.zero_()
    assert accuracy(identity, (x, y)) == pytest.approx(3 / 5)  # argmax = [0, 1, 0, 1, 0]


def test_eval_mode_no_grad_and_mode_restored():
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.drop = nn.Dropout(0.9)

        def forward(self, x):
            seen["training"] = self.training
            seen["grad"] = torch.is_grad_enabled()
            return self.drop(self.lin(x))

    model = Probe().train()
    first = accuracy(model, (X, Y))
    assert seen == {"training": False, "grad": False}
    assert model.training and model.drop.training  # restored
    assert accuracy(model, (X, Y)) == first  # dropout was off: deterministic


def test_agreement():
    assert agreement(_constant(A), _constant(B), (X, Y)) == 0.0
    assert agreement(_constant(A), _constant([0.6, 0.4]), (X, Y)) == 1.0
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 2.0]])
    identity = nn.Linear(2, 2)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(2))
        identity.bias.zero_()
    assert agreement(identity, _constant(A), (x, torch.zeros(4, dtype=torch.long))) == 0.5


def test_bad_data():
    with pytest.raises(ValueError, match="differ in length"):
        accuracy(_constant(A), (X, Y[:2]))
    with pytest.raises(TypeError, match="batches"):
        accuracy(_constant(A), [X, X, X])
    with pytest.raises(ValueError, match="no samples"):
        accuracy(_constant(A), [])


def test_format_table():
    rows = [EvalRow("parent 0", "parent", 0.9, 0.25), EvalRow("OT fusion", "fused", 0.875, 0.5)]
    assert format_table(rows).splitlines() == [
        "| model | accuracy (%) | loss |",
        "|---|---:|---:|",
        "| parent 0 | 90.00 | 0.2500 |",
        "| OT fusion | 87.50 | 0.5000 |",
    ]


def test_evaluate_fusion_rows_on_hand_made_models():
    parents = [_constant(A), _constant(B)]
    fused = _constant([0.2, 0.8])
    rows = evaluate_fusion(parents, fused, (X, Y))
    assert [(r.name, r.kind) for r in rows] == [
        ("parent 0", "parent"),
        ("parent 1", "parent"),
        ("vanilla average", "vanilla"),
        ("ensemble", "ensemble"),
        ("OT fusion", "fused"),
    ]
    acc = {r.name: r.accuracy for r in rows}
    los = {r.name: r.loss for r in rows}
    assert acc["parent 0"] == pytest.approx(0.75) and acc["parent 1"] == pytest.approx(0.25)
    assert acc["OT fusion"] == pytest.approx(0.25)
    # Ensemble: mean probabilities (0.6, 0.4) -> class 0; its loss is the NLL of those probabilities.
    assert acc["ensemble"] == pytest.approx(0.75)
    assert los["ensemble"] == pytest.approx(-(3 * math.log(0.6) + math.log(0.4)) / 4, rel=1e-5)
    # Vanilla average: the mean of the biases, log(sqrt(.27)) vs log(sqrt(.07)) -> class 0.
    p0 = math.sqrt(0.27) / (math.sqrt(0.27) + math.sqrt(0.07))
    assert acc["vanilla average"] == pytest.approx(0.75)
    assert los["vanilla average"] == pytest.approx(-(3 * math.log(p0) + math.log(1 - p0)) / 4, rel=1e-5)
    # Inputs untouched.
    assert torch.allclose(parents[0].bias, torch.log(torch.tensor(A)))


def test_evaluate_fusion_weights_and_given_vanilla():
    parents = [_constant(A), _constant(B)]
    # Weights (0.25, 0.75): ensemble probabilities (0.45, 0.55) -> class 1.
    rows = evaluate_fusion(parents, parents[0], (X, Y), vanilla=_constant(B), weights=[0.25, 0.75])
    acc = {r.name: r.accuracy for r in rows}
    assert acc["ensemble"] == pytest.approx(0.25)
    assert acc["vanilla average"] == pytest.approx(0.25)  # the model passed in, not a recomputed one
    assert acc["OT fusion"] == pytest.approx(0.75)


def test_evaluate_fusion_skips_vanilla_for_different_widths():
    torch.manual_seed(0)
    narrow = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    wide = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    rows = evaluate_fusion([narrow, wide], narrow, (X, Y))
    assert [r.kind for r in rows] == ["parent", "parent", "ensemble", "fused"]


class _KeywordModel(nn.Module):
    """A transformers-like model: keyword tensor inputs, an output object with ``.logits``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(2))
            self.lin.bias.zero_()

    def forward(self, input_ids, attention_mask=None):
        assert input_ids.device == self.lin.weight.device
        x = input_ids.float() if attention_mask is None else input_ids.float() * attention_mask
        return SequenceClassifierOutput(logits=self.lin(x))


def test_logits_of():
    t = torch.ones(2, 3)
    assert logits_of(t) is t
    assert logits_of(SequenceClassifierOutput(logits=t)) is t
    with pytest.raises(TypeError, match="tuple"):
        logits_of((t,))


def test_dict_inputs_and_logits_outputs():
    ids = torch.tensor([[3, 1], [0, 2], [5, 4], [1, 1]])
    mask = torch.tensor([[1, 1], [1, 1], [0, 1], [1, 1]])
    y = torch.tensor([0, 1, 1, 0])  # argmax of ids*mask: [0, 1, 1, 0] (ties go to index 0)
    batches = [({"input_ids": ids[:3], "attention_mask": mask[:3]}, y[:3]), ({"input_ids": ids[3:]}, y[3:])]
    model = _KeywordModel()
    assert accuracy(model, batches) == 1.0
    expected = nn.functional.cross_entropy((ids * mask).float(), y)
    assert loss(model, batches) == pytest.approx(expected.item(), rel=1e-6)
    assert agreement(model, model, batches) == 1.0
    always_one = _KeywordModel()
    with torch.no_grad():
        always_one.lin.weight.zero_()
        always_one.lin.bias.copy_(torch.tensor([0.0, 1.0]))
    assert agreement(model, always_one, batches) == 0.5


def test_evaluate_fusion_with_dict_inputs():
    ids = torch.tensor([[3, 1], [0, 2]])
    batches = [({"input_ids": ids}, torch.tensor([0, 1]))]
    rows = evaluate_fusion([_KeywordModel(), _KeywordModel()], _KeywordModel(), batches)
    assert [r.kind for r in rows] == ["parent", "parent", "vanilla", "ensemble", "fused"]
    assert all(r.accuracy == 1.0 for r in rows)


def test_evaluate_fusion_names_extra_rows_and_agreement():
    parents = [_constant(A), _constant(B)]
    fused = _constant([0.2, 0.8])
    before = _constant([0.6, 0.4])
    rows = evaluate_fusion(parents, None, (X, Y), names=["org/a", "org/b"], agreement=True,
                           extra=[("OT fusion", "fused_before_finetune", before),
                                  ("OT fusion + fine-tune", "fused", fused)])
    assert [(r.name, r.kind) for r in rows] == [
        ("org/a", "parent"),
        ("org/b", "parent"),
        ("vanilla average", "vanilla"),
        ("ensemble", "ensemble"),
        ("OT fusion", "fused_before_finetune"),
        ("OT fusion + fine-tune", "fused"),
    ]
    # the ensemble predicts class 0 everywhere: parent A and the model "before" agree with it, B and "fused" never
    agree = {r.name: r.agreement for r in rows}
    assert agree == {"org/a": 1.0, "org/b": 0.0, "vanilla average": 1.0, "ensemble": 1.0, "OT fusion": 1.0,
                     "OT fusion + fine-tune": 0.0}
    table = format_table(rows).splitlines()
    assert table[0] == "| model | accuracy (%) | loss | agreement with ensemble (%) |"
    assert table[-1].startswith("| OT fusion + fine-tune | 25.00 |") and table[-1].endswith("| 0.00 |")
    named = evaluate_fusion(parents, fused, (X, Y), fused_name="fused!")
    assert named[-1].name == "fused!" and named[-1].agreement is None
    assert "agreement" not in format_table(named)
    with pytest.raises(ValueError, match="3 names for 2 parents"):
        evaluate_fusion(parents, fused, (X, Y), names=["a", "b", "c"])


def test_format_table_marks_rows_without_agreement():
    rows = [EvalRow("parent 0", "parent", 0.9, 0.25, agreement=0.5), EvalRow("x", "fused", 0.5, 1.0)]
    assert format_table(rows).splitlines()[-1] == "| x | 50.00 | 1.0000 | - |"
