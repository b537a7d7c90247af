"""Accuracy and loss of parents, vanilla average, prediction ensemble and fused model on a dataset.

``data`` is either a pair of tensors ``(x, y)`` or an iterable of ``(input, label)`` batches (a
DataLoader). An input is a tensor (``model(x)``) or a dict of tensors (``model(**x)``, e.g. tokenized
text); a model may return a tensor or an object with ``.logits`` (a transformers ``ModelOutput``).
Models are evaluated in eval mode without gradients; each model's train/eval mode is restored afterwards.

Language models (transformers ``*ForCausalLM`` / ``*LMHeadModel``, ``*ForMaskedLM``; see ``language_model_kind``)
are scored per token instead of per sample, on dict inputs with ``input_ids`` (and ``attention_mask``):

- causal: next-token cross-entropy on every token that is not padding (the token labels are ``input_ids`` with
  -100 where ``attention_mask`` is 0, shifted by one, as transformers does with ``labels=``);
- masked: the cross-entropy on masked tokens only. When the batch's label slot holds token labels (a tensor of
  ``input_ids``' shape, -100 where not scored: what ``data.make_loader_for_model`` gives a masked LM), the inputs
  are taken as already masked; otherwise ``mask_tokens`` masks 15% of each row's tokens, seeded, so every model
  sees the same masked positions.

The loss is exact over tokens: the sum of the token losses divided by the number of scored tokens (never a mean
of batch means); perplexity is ``exp(loss)``. Accuracy is not measured for language models (``None``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import shard, sum_numbers
from .errors import DataError

Data = tuple[torch.Tensor, torch.Tensor] | Iterable
Inputs = torch.Tensor | Mapping[str, torch.Tensor]
LMKind = Literal["causal", "masked"]
_TENSOR_BATCH = 1024
IGNORE_INDEX = -100  # a token label that is not scored (transformers' convention)
MASK_RATE = 0.15
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_MASKED_SUFFIXES = ("ForMaskedLM",)


@dataclass(frozen=True)
class EvalRow:
    """One line of an evaluation table: a model's name, its role, its accuracy (0-1) and mean loss.

    ``agreement`` (0-1, optional): the fraction of samples (of scored tokens, for a language model) on which the
    model predicts the same class (token) as the prediction ensemble of the parents.
    For a language model (``task`` ``"causal-lm"`` or ``"masked-lm"``) ``accuracy`` is None, ``loss`` the mean
    token cross-entropy, ``perplexity`` ``exp(loss)`` and ``tokens`` the number of scored tokens.
    """

    name: str
    kind: str  # "parent", "vanilla", "ensemble", "fused", or another role (e.g. "fused_before_finetune")
    accuracy: float | None
    loss: float
    agreement: float | None = None
    perplexity: float | None = None
    tokens: int | None = None
    task: str = "classification"  # or "causal-lm", "masked-lm"


def language_model_kind(model: nn.Module) -> LMKind | None:
    """``"causal"`` for a transformers ``*ForCausalLM`` / ``*LMHeadModel``, ``"masked"`` for a ``*ForMaskedLM``,
    None for anything else (a classifier). An ``Ensemble`` of language models has its members' kind."""
    members = getattr(model, "members", None)
    if isinstance(members, nn.ModuleList) and len(members) > 0:
        kinds = {language_model_kind(m) for m in members}
        return kinds.pop() if len(kinds) == 1 else None
    name = type(model).__name__
    if name.endswith(_CAUSAL_SUFFIXES):
        return "causal"
    if name.endswith(_MASKED_SUFFIXES):
        return "masked"
    return None


def perplexity_of(loss: float) -> float:
    """``exp(loss)``, or ``inf`` where that overflows (or the loss is not finite)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _row_seed(seed: int, row: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + row) % (2**63)


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    mask_token_id: int,
    special_ids: Iterable[int] = (),
    seed: int = 0,
    first_row: int = 0,
    rate: float = MASK_RATE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded masking for a masked-LM evaluation: ``(masked input_ids, token labels)``.

    In each row, ``round(rate * n)`` (at least one) of its ``n`` maskable tokens (``attention_mask`` 1 and not one
    of ``special_ids``) are replaced by ``mask_token_id``; the labels hold the original ids there and -100
    elsewhere. Row ``i`` of the batch is row ``first_row + i`` of the data: its positions depend only on ``seed``,
    that row number and its number of maskable tokens, so every pass over the same data (every model) masks the
    same tokens, whatever the batch size or padding.
    """
    ids = input_ids.clone()
    labels = torch.full_like(ids, IGNORE_INDEX)
    eligible = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool().clone()
    for special in special_ids:
        eligible &= ids != special
    for r in range(ids.shape[0]):
        positions = eligible[r].nonzero().flatten()
        n = len(positions)
        if n == 0:
            continue
        k = max(1, round(rate * n))
        gen = torch.Generator().manual_seed(_row_seed(seed, first_row + r))
        chosen = positions[torch.randperm(n, generator=gen)[:k].to(positions.device)]
        labels[r, chosen] = ids[r, chosen]
        ids[r, chosen] = mask_token_id
    return ids, labels


def _special_ids(model: nn.Module) -> list[int]:
    """The special token ids a model's config names (padding, start, end, separator, classifier)."""
    members = getattr(model, "members", None)
    if isinstance(members, nn.ModuleList) and len(members) > 0:
        model = members[0]
    config = getattr(model, "config", None)
    names = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id")
    found = [getattr(config, name, None) for name in names]
    return sorted({int(i) for i in found if isinstance(i, int)})


def _mask_token_id(model: nn.Module) -> int | None:
    members = getattr(model, "members", None)
    if isinstance(members, nn.ModuleList) and len(members) > 0:
        model = members[0]
    value = getattr(getattr(model, "config", None), "mask_token_id", None)
    return int(value) if isinstance(value, int) else None


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or its ``.logits`` (a transformers ``ModelOutput``)."""
    logits = getattr(output, "logits", output)
    if not torch.is_tensor(logits):
        raise DataError(f"expected the model to return a tensor or an output with .logits, got {type(output).__name__}")
    return logits


def batch_logits(model: nn.Module, x: Inputs, device: torch.device) -> torch.Tensor:
    """The model's logits on one batch of inputs, moved to ``device`` first (keyword tensors for a dict)."""
    if isinstance(x, Mapping):
        return logits_of(model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in x.items()}))
    return logits_of(model(x.to(device)))


def labelled_batches(data: Data) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """The ``(inputs, labels)`` batches of ``data``: a pair of tensors cut into batches, or an iterable of
    batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
        if len(x) != len(y):
            raise DataError(f"inputs and labels differ in length: {len(x)} != {len(y)}")
        for start in range(0, len(x), _TENSOR_BATCH):
            yield x[start : start + _TENSOR_BATCH], y[start : start + _TENSOR_BATCH]
        return
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise DataError("data must be (inputs, labels) tensors or an iterable of (input, label) batches")
        yield batch[0], batch[1]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


@dataclass
class _Totals:
    """What one pass over the data sums: correct predictions (None for an LM), samples or scored tokens, the summed
    cross-entropy, and the argmax predictions (of samples, or of scored tokens) when asked."""

    correct: int | None
    total: int
    loss_sum: float
    preds: torch.Tensor | None

    @property
    def loss(self) -> float:
        return self.loss_sum / self.total

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / self.total


def _lm_batch(
    kind: LMKind, x: Inputs, y: torch.Tensor, *, mask_token_id: int | None, special_ids: Sequence[int], seed: int,
    first_row: int,
) -> tuple[Mapping[str, torch.Tensor], torch.Tensor]:
    """The inputs to run and the token labels to score (-100: not scored) of one language-model batch."""
    if not isinstance(x, Mapping) or "input_ids" not in x:
        raise DataError("a language model is evaluated on dict batches with 'input_ids' (and 'attention_mask')")
    ids = x["input_ids"]
    attention = x.get("attention_mask")
    token_labels = torch.is_tensor(y) and y.shape == ids.shape
    if kind == "causal":
        if token_labels:
            return x, y
        labels = ids if attention is None else ids.masked_fill(attention == 0, IGNORE_INDEX)
        return x, labels
    if token_labels:  # already masked (the loader does it for a masked LM)
        return x, y
    if mask_token_id is None:
        raise DataError("a masked language model needs masked inputs with token labels, or a mask_token_id")
    masked, labels = mask_tokens(ids, attention, mask_token_id=mask_token_id, special_ids=special_ids, seed=seed,
                                 first_row=first_row)
    return {**x, "input_ids": masked}, labels


def _run(
    model: nn.Module, data: Data, device: str | torch.device | None, predictions: bool = False, *,
    lm: LMKind | None | Literal["auto"] = "auto", mask_token_id: int | None = None, seed: int = 0,
) -> _Totals:
    """One pass of ``model`` over ``data``: per sample for a classifier, per scored token for a language model."""
    if lm == "auto":
        lm = language_model_kind(model)
    if lm == "masked" and mask_token_id is None:
        mask_token_id = _mask_token_id(model)
    special = _special_ids(model) if lm == "masked" else []
    if device is not None:
        model.to(device)
    dev = model_device(model)
    correct, total, loss_sum, rows = 0, 0, 0.0, 0
    preds: list[torch.Tensor] = []

    def skipped(batch: tuple[Inputs, torch.Tensor]) -> None:  # another process's batch: a masked LM counts its rows
        nonlocal rows
        rows += len(batch[1])

    with _eval_mode(model):
        for x, y in shard(labelled_batches(data), "evaluation", skipped=skipped):
            if lm is None:
                y = y.to(dev)
                logits = batch_logits(model, x, dev)
                # cross_entropy applies log_softmax, which leaves log-probabilities (an ensemble) unchanged.
                loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
                pred = logits.argmax(dim=-1)
                correct += (pred == y).sum().item()
                total += len(y)
            else:
                x, labels = _lm_batch(lm, x, y, mask_token_id=mask_token_id, special_ids=special, seed=seed,
                                      first_row=rows)
                rows += len(labels)
                logits = batch_logits(model, x, dev).float()
                labels = labels.to(logits.device)
                if lm == "causal":
                    logits, labels = logits[:, :-1], labels[:, 1:]
                scored = labels != IGNORE_INDEX
                logits, labels = logits[scored], labels[scored]
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
                pred = logits.argmax(dim=-1)
                total += len(labels)
            if predictions:
                preds.append(pred.cpu())
    correct, total, loss_sum = sum_numbers(correct, total, loss_sum)  # every process's batches
    correct, total = int(correct), int(total)
    if total == 0:
        raise DataError("no samples to evaluate" if lm is None else "no tokens to evaluate (all padding?)")
    return _Totals(None if lm is not None else correct, total, loss_sum, _joined(preds) if predictions else None)


def _joined(preds: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)  # a process given no batch


def accuracy(model: nn.Module, data: Data, device: str | torch.device | None = None) -> float:
    """Fraction (0-1) of samples whose argmax prediction equals the label (classifiers only)."""
    if language_model_kind(model) is not None:
        raise DataError("accuracy is measured for classifiers; for a language model use loss or perplexity")
    return _run(model, data, device).accuracy


def loss(model: nn.Module, data: Data, device: str | torch.device | None = None, *,
         mask_token_id: int | None = None, seed: int = 0) -> float:
    """Mean cross-entropy of the model's outputs (logits or log-probabilities) against the labels; for a language
    model, the mean over scored tokens (``mask_token_id`` and ``seed``: the masking of a masked LM)."""
    return _run(model, data, device, mask_token_id=mask_token_id, seed=seed).loss


def perplexity(model: nn.Module, data: Data, device: str | torch.device | None = None, *,
               mask_token_id: int | None = None, seed: int = 0) -> float:
    """``exp`` of a language model's mean token loss (see ``loss``)."""
    return perplexity_of(loss(model, data, device, mask_token_id=mask_token_id, seed=seed))


def accuracy_and_loss(model: nn.Module, data: Data,
                      device: str | torch.device | None = None) -> tuple[float | None, float]:
    """Accuracy and mean loss in one pass over the data (accuracy None for a language model)."""
    totals = _run(model, data, device)
    return totals.accuracy, totals.loss


def agreement(model_a: nn.Module, model_b: nn.Module, data: Data, device: str | torch.device | None = None) -> float:
    """Fraction of samples on which the two models' argmax predictions are equal (labels are ignored); for
    language models, of scored tokens."""
    if device is not None:
        model_a.to(device)
        model_b.to(device)
    if language_model_kind(model_a) is not None or language_model_kind(model_b) is not None:
        pred_a = _run(model_a, data, None, predictions=True).preds
        pred_b = _run(model_b, data, None, predictions=True).preds
        if pred_a is None or pred_b is None or len(pred_a) != len(pred_b):
            raise DataError("the two models scored different tokens")
        same, total = sum_numbers((pred_a == pred_b).sum().item(), len(pred_a))  # this process's tokens, summed
        return same / total
    dev_a, dev_b = model_device(model_a), model_device(model_b)
    same, total = 0, 0
    with _eval_mode(model_a), _eval_mode(model_b):
        for x, _ in shard(labelled_batches(data), "evaluation"):
            pred_a = batch_logits(model_a, x, dev_a).argmax(dim=-1)
            pred_b = batch_logits(model_b, x, dev_b).argmax(dim=-1).to(pred_a.device)
            same += (pred_a == pred_b).sum().item()
            total += len(pred_a)
    same, total = sum_numbers(same, total)
    if total == 0:
        raise DataError("no samples to evaluate")
    return same / total


def evaluate_fusion(
    parents: Sequence[nn.Module],
    fused: nn.Module | None,
    data: Data,
    vanilla: nn.Module | None = None,
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    *,
    names: Sequence[str] | None = None,
    fused_name: str = "OT fusion",
    extra: Sequence[tuple[str, str, nn.Module]] = (),
    agreement: bool = False,
    mask_token_id: int | None = None,
    seed: int = 0,
) -> list[EvalRow]:
    """Rows for each parent, the vanilla average, the prediction ensemble and the fused model.

    ``vanilla`` defaults to ``vanilla_average(parents, weights)``; when the parents' shapes differ (no
    vanilla average exists) that row is left out. The ensemble is ``ensemble(parents, weights)``.

    Args:
        names: one name per parent (default ``"parent 0"``, ``"parent 1"``, ...).
        fused_name: the fused model's row name; ``fused=None`` leaves that row out.
        extra: more ``(name, kind, model)`` rows, after the fused model's (e.g. the fused model after a
            fine-tune, or before a repair).
        agreement: also measure each row's agreement with the ensemble's predictions (``EvalRow.agreement``).
        mask_token_id, seed: for masked language models on data without token labels, the token that replaces
            the masked ones (default: the parents' ``config.mask_token_id``) and the masking seed.

    Language models (all parents of one ``language_model_kind``) get token-level rows: ``loss`` the mean token
    cross-entropy, ``perplexity``, ``tokens``, accuracy None, and the ensemble averages token probabilities.

    Example:
        >>> rows = evaluate_fusion([a, b], fused, (x_test, y_test), names=["a", "b"], agreement=True)  # doctest: +SKIP
        >>> print(format_table(rows))  # doctest: +SKIP
    """
    from .fuse import ensemble, vanilla_average  # (fuse imports this module)

    if len(parents) < 1:
        raise DataError("evaluate_fusion needs at least one parent")
    if names is None:
        names = [f"parent {i}" for i in range(len(parents))]
    elif len(names) != len(parents):
        raise DataError(f"got {len(names)} names for {len(parents)} parents")
    if vanilla is None:
        shapes = [{k: tuple(v.shape) for k, v in p.state_dict().items()} for p in parents]
        if all(s == shapes[0] for s in shapes[1:]):
            vanilla = vanilla_average(list(parents), weights=weights)
    kinds = {language_model_kind(p) for p in parents}
    if len(kinds) != 1:
        raise DataError("the parents mix language models and other models (or causal and masked LMs)")
    lm = kinds.pop()
    task = "classification" if lm is None else f"{lm}-lm"
    ens = ensemble(list(parents), weights=weights)
    candidates: list[tuple[str, str, nn.Module]] = [(n, "parent", p) for n, p in zip(names, parents, strict=True)]
    if vanilla is not None:
        candidates.append(("vanilla average", "vanilla", vanilla))
    candidates.append(("ensemble", "ensemble", ens))
    if fused is not None:
        candidates.append((fused_name, "fused", fused))
    candidates.extend(extra)
    if lm == "masked" and mask_token_id is None:
        mask_token_id = _mask_token_id(parents[0])

    def run(model: nn.Module) -> _Totals:
        return _run(model, data, device, predictions=agreement, lm=lm, mask_token_id=mask_token_id, seed=seed)

    ens_result = run(ens)
    reference = ens_result.preds
    rows = []
    for name, kind, model in candidates:
        result = ens_result if model is ens else run(model)
        agree = None
        if reference is not None and result.preds is not None:
            if len(result.preds) != len(reference) or result.total != ens_result.total:
                raise DataError("the data gave a different number of samples on a second pass")
            same, count = sum_numbers((result.preds == reference).sum().item(), len(reference))  # every process's
            agree = same / count
        rows.append(EvalRow(name=name, kind=kind, accuracy=result.accuracy, loss=result.loss, agreement=agree,
                            perplexity=None if lm is None else perplexity_of(result.loss),
                            tokens=None if lm is None else result.total, task=task))
    return rows


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def format_table(rows: Sequence[EvalRow]) -> str:
    """A markdown table of the rows: model, accuracy (%) (classifiers), loss, perplexity (language models), and
    agreement with the ensemble (%) when measured. A cell a row has no value for is ``-``."""
    with_accuracy = any(row.accuracy is not None for row in rows) or not rows
    with_perplexity = any(row.perplexity is not None for row in rows)
    with_agreement = any(row.agreement is not None for row in rows)
    columns: list[tuple[str, Any]] = []
    if with_accuracy:
        columns.append(("accuracy (%)", lambda r: None if r.accuracy is None else f"{100 * r.accuracy:.2f}"))
    columns.append(("loss", lambda r: _number(r.loss, 4)))
    if with_perplexity:
        columns.append(("perplexity", lambda r: None if r.perplexity is None else _number(r.perplexity, 2)))
    if with_agreement:
        columns.append(("agreement with ensemble (%)",
                        lambda r: None if r.agreement is None else f"{100 * r.agreement:.2f}"))
    lines = ["| model | " + " | ".join(title for title, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = [cell(row) for _, cell in columns]
        lines.append(f"| {row.name} | " + " | ".join("-" if c is None else c for c in cells) + " |")
    return "\n".join(lines)
