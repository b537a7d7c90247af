"""Evaluation helpers on hand-made models whose predictions are known in advance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_otfusion.data import make_loader
from hf_otfusion.errors import DataError
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
    with pytest.raises(DataError, match="batches"):
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
    with pytest.raises(DataError, match="tuple"):
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


# ---------------------------------------------------------------------------------------------------------------------
# Language models: token-level loss and perplexity
# ---------------------------------------------------------------------------------------------------------------------


def _llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_otfusion.testing import VOCAB_SIZE

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, use_cache=False,
                      pad_token_id=256)
    return LlamaForCausalLM(cfg).eval()


def _bert_mlm(seed: int):
    from transformers import BertConfig, BertForMaskedLM

    from hf_otfusion.testing import VOCAB_SIZE

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, max_position_embeddings=64, pad_token_id=256)
    return BertForMaskedLM(cfg).eval()


def _rows(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen) for n in lengths]


def _padded(rows: list[torch.Tensor], pad: int = 256) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _batches_of(rows: list[torch.Tensor], size: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    return [(_padded(rows[i : i + size]), torch.full((len(rows[i : i + size]),), -1))
            for i in range(0, len(rows), size)]


def _hand_causal(log_probs_of, rows: list[torch.Tensor]) -> tuple[float, int]:
    """(summed next-token loss, number of tokens) row by row, unpadded: the definition, by hand."""
    total, count = 0.0, 0
    for r in rows:
        logp = log_probs_of(r[None])[0]  # (T, V)
        for t in range(len(r) - 1):
            total -= logp[t, r[t + 1]].item()
            count += 1
    return total, count


LENGTHS = [5, 9, 2, 7, 12]


def test_causal_lm_loss_is_token_weighted_and_ignores_padding():
    from hf_otfusion.evaluate import EvalRow, language_model_kind, perplexity

    model = _llama(0)
    assert language_model_kind(model) == "causal"
    rows = _rows(LENGTHS)
    with torch.no_grad():
        total, count = _hand_causal(lambda ids: model(input_ids=ids).logits.log_softmax(-1), rows)
    assert count == sum(n - 1 for n in LENGTHS)
    expected = total / count
    # ragged, padded batches of 2 (the last has one row): the sum over tokens / the number of tokens
    assert loss(model, _batches_of(rows, 2)) == pytest.approx(expected, rel=1e-5)
    assert loss(model, _batches_of(rows, 5)) == pytest.approx(expected, rel=1e-5)  # one batch, much padding
    # not a mean of batch means (they would weigh the 2-token row like the 12-token ones)
    batch_means = [loss(model, [b]) for b in _batches_of(rows, 1)]
    assert abs(sum(batch_means) / len(batch_means) - expected) > 1e-3
    assert perplexity(model, _batches_of(rows, 2)) == pytest.approx(math.exp(expected), rel=1e-5)
    # the same as transformers' own loss on one unpadded batch
    x = {"input_ids": rows[1][None]}
    with torch.no_grad():
        assert loss(model, [(x, torch.tensor([-1]))]) == pytest.approx(model(**x, labels=x["input_ids"]).loss.item(),
                                                                      rel=1e-5)
    with pytest.raises(ValueError, match="classifiers"):
        accuracy(model, _batches_of(rows, 2))
    assert EvalRow("m", "parent", None, 1.0).accuracy is None


def test_causal_lm_token_labels_in_the_label_slot():
    model = _llama(0)
    rows = _rows(LENGTHS)
    x = _padded(rows)
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    assert loss(model, [(x, labels)]) == pytest.approx(loss(model, _batches_of(rows, 5)), rel=1e-6)
    only_first = labels.clone()
    only_first[1:] = -100  # score row 0 only
    assert loss(model, [(x, only_first)]) == pytest.approx(loss(model, _batches_of(rows[:1], 1)), rel=1e-5)


def test_mask_tokens_is_seeded_per_row():
    from hf_otfusion.evaluate import mask_tokens

    rows = _rows([20, 40, 7, 1, 33], seed=3)
    x = _padded(rows)
    ids, labels = mask_tokens(x["input_ids"], x["attention_mask"], mask_token_id=259, special_ids=[256], seed=0)
    for i, r in enumerate(rows):
        chosen = labels[i] != -100
        assert int(chosen.sum()) == max(1, round(0.15 * len(r)))
        assert not chosen[len(r):].any()  # never padding
        assert torch.equal(labels[i][chosen], r[chosen[: len(r)]])
        assert bool((ids[i][chosen] == 259).all()) and torch.equal(ids[i][~chosen], x["input_ids"][i][~chosen])
    again = mask_tokens(x["input_ids"], x["attention_mask"], mask_token_id=259, special_ids=[256], seed=0)
    assert torch.equal(again[0], ids) and torch.equal(again[1], labels)
    # the same positions when the rows come in other batches, padded otherwise
    tail = _padded(rows[2:])
    _, tail_labels = mask_tokens(tail["input_ids"], tail["attention_mask"], mask_token_id=259, seed=0, first_row=2)
    for i in range(2, 5):
        assert torch.equal(tail_labels[i - 2][: len(rows[i])], labels[i][: len(rows[i])])
    other = mask_tokens(x["input_ids"], x["attention_mask"], mask_token_id=259, seed=1)[1]
    assert not torch.equal(other != -100, labels != -100)


def test_masked_lm_loss_on_masked_tokens_only():
    from hf_otfusion.evaluate import language_model_kind, mask_tokens

    model = _bert_mlm(0)
    assert language_model_kind(model) == "masked"
    rows = _rows([10, 30, 16, 25], seed=1)
    batches = _batches_of(rows, 2)
    first = loss(model, batches, mask_token_id=259)
    assert loss(model, batches, mask_token_id=259) == first  # deterministic
    assert loss(model, _batches_of(rows, 3), mask_token_id=259) == pytest.approx(first, rel=1e-5)  # batching
    # by hand: mask all rows in one batch, score the masked tokens with the model's log-probabilities
    x = _padded(rows)
    ids, labels = mask_tokens(x["input_ids"], x["attention_mask"], mask_token_id=259, special_ids=[256])
    with torch.no_grad():
        logp = model(input_ids=ids, attention_mask=x["attention_mask"]).logits.log_softmax(-1)
    chosen = labels != -100
    hand = -logp[chosen].gather(1, labels[chosen][:, None]).sum().item() / int(chosen.sum())
    assert first == pytest.approx(hand, rel=1e-5)
    with pytest.raises(ValueError, match="mask_token_id"):
        loss(model, batches)  # BERT's config names no mask token


def test_evaluate_fusion_rows_for_language_models():
    a, b = _llama(0), _llama(1)
    rows = _rows(LENGTHS)
    data = _batches_of(rows, 2)
    result = evaluate_fusion([a, b], a, data, names=["a", "b"], agreement=True)
    by_kind = {r.kind: r for r in result}
    assert [r.kind for r in result] == ["parent", "parent", "vanilla", "ensemble", "fused"]
    for r in result:
        assert r.accuracy is None and r.task == "causal-lm" and r.tokens == sum(n - 1 for n in LENGTHS)
        assert r.perplexity == pytest.approx(math.exp(r.loss), rel=1e-9)
        assert 0 <= r.agreement <= 1
    assert by_kind["ensemble"].agreement == 1.0
    assert by_kind["fused"].loss == pytest.approx(result[0].loss, rel=1e-6)  # the "fused" model here is parent a
    # the ensemble averages token probabilities: -log((p_a + p_b) / 2) per token, by hand
    with torch.no_grad():
        total, count = _hand_causal(
            lambda ids: ((a(input_ids=ids).logits.softmax(-1) + b(input_ids=ids).logits.softmax(-1)) / 2).log(), rows)
    assert by_kind["ensemble"].loss == pytest.approx(total / count, rel=1e-5)
    assert by_kind["ensemble"].loss <= (result[0].loss + result[1].loss) / 2  # -log of a mean <= mean of -logs
    table = format_table(result)
    assert table.splitlines()[0] == "| model | loss | perplexity | agreement with ensemble (%) |"
    assert f"| ensemble | {by_kind['ensemble'].loss:.4f} | {by_kind['ensemble'].perplexity:.2f} | 100.00 |" in table
    with pytest.raises(ValueError, match="mix language models"):
        evaluate_fusion([a, _constant(A)], None, data)


def test_format_table_mixes_missing_cells():
    rows = [EvalRow("lm", "parent", None, 2.0, perplexity=math.exp(2.0)), EvalRow("clf", "parent", 0.5, 1.0)]
    assert format_table(rows).splitlines()[2:] == ["| lm | - | 2.0000 | 7.39 |", "| clf | 50.00 | 1.0000 | - |"]


def test_merge_evaluates_a_causal_lm_pair_on_stdlib_text(tmp_path):
    from hf_otfusion import merge
    from hf_otfusion.config import parse_config
    from hf_otfusion.testing import stdlib_text_dataset, tiny_llama

    data = stdlib_text_dataset(tmp_path / "text", length=48, num_train=8, num_test=6)
    parents = [tiny_llama(tmp_path / f"lm{s}", seed=s) for s in (0, 1)]
    config = parse_config({"merge_method": "linear", "models": [{"model": str(p)} for p in parents],
                           "evaluation": {"dataset": str(data), "split": "test", "batch_size": 4}})
    result = merge(config, tmp_path / "out", progress=False)
    rows = result.evaluation
    assert [r.kind for r in rows] == ["parent", "parent", "vanilla", "ensemble", "fused"]
    # 6 texts of 48 ASCII characters: one token per byte, 47 predicted tokens each
    assert all(r.task == "causal-lm" and r.accuracy is None and r.tokens == 6 * 47 for r in rows)
    assert all(r.perplexity == pytest.approx(math.exp(r.loss)) for r in rows)
    assert rows[2].loss == pytest.approx(rows[4].loss, rel=1e-6)  # a linear merge is the vanilla average
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| model | loss | perplexity | agreement with ensemble (%) |" in card
    assert f"| linear merge | {rows[4].loss:.4f} | {rows[4].perplexity:.2f} |" in card
    assert "mean next-token cross-entropy (nats per token) over 282 tokens" in card
