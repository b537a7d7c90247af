"""Export one forward pass of a model as an ATen graph (``torch.export`` + the empty decomposition table)."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from ..errors import PlanError


def as_args(example_input: Any) -> tuple[tuple, dict]:
    """Split an example input (tensor, tuple/list of tensors, or dict of keyword tensors) into args, kwargs."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,), {}
    if isinstance(example_input, dict) or hasattr(example_input, "keys"):
        return (), {k: v for k, v in dict(example_input).items() if k != "labels"}
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    raise PlanError(f"cannot use an example input of type {type(example_input).__name__}: pass a tensor, "
                    "a tuple of tensors or a dict of keyword tensors")


def _at_least_two(value: Any) -> Any:
    # View arguments bake the batch size in when it is 1; a batch of 2 keeps it symbolic.
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1:
        return torch.cat([value, value])
    return value


def export_model(model: nn.Module, example_input: Any) -> ExportedProgram:
    """Export one forward pass of ``model`` (eval mode) as an ATen graph with a dynamic batch dimension."""
    args, kwargs = as_args(example_input)
    args = tuple(_at_least_two(a) for a in args)
    kwargs = {k: _at_least_two(v) for k, v in kwargs.items()}
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), no_cache(model), grouped_experts(model):
            warnings.simplefilter("ignore", FutureWarning)
            return _export(model, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - torch raises many types; the user needs one clear message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(f"could not trace {type(model).__name__} with torch.export: {first}") from exc
    finally:
        model.train(was_training)


def _dynamic_batch(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Dynamic-shape spec with a dynamic batch dim for every tensor input: by parameter name when kwargs are given."""

    def spec(v: Any) -> Any:
        return {0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() else None

    if not kwargs:
        return tuple(spec(a) for a in args)
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return (*(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()})
    params = inspect.signature(model.forward).parameters
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: spec(v) for k, v in value.items()}
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(spec(v) for v in value)
        else:
            out[name] = spec(value)
    return out


@contextlib.contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
    """Trace without a key/value cache: ``use_cache`` is off in every config a transformers model's modules hold
    while tracing and restored afterwards, so the model the user saves is unchanged and the graph's inputs are
    the user's own (a cache object is no graph output torch.export can return)."""
    configs = [getattr(m, "config", None) for m in model.modules()]  # T5's stacks hold copies of the config
    for config in list(configs):
        with contextlib.suppress(Exception):
            configs.append(config.get_text_config(decoder=True))
    saved = [(c, c.use_cache) for c in {id(c): c for c in configs if c is not None}.values()
             if getattr(c, "use_cache", None)]
    for c, _ in saved:
        c.use_cache = False
    try:
        yield
    finally:
        for c, value in saved:
            c.use_cache = value


@contextlib.contextmanager
def grouped_experts(model: nn.Module) -> Iterator[None]:
    """Trace a transformers mixture of experts with its ``grouped_mm`` experts (restored afterwards): the eager
    implementation loops over the experts the data routes to, which ``torch.export`` cannot trace, and the
    grouped one is the layout the tracer's expert rules read (:mod:`hf_otfusion.trace.rules.experts`)."""
    get = getattr(model, "get_experts_implementation", None)
    saved = None
    with contextlib.suppress(Exception):  # a model without experts, or an implementation that cannot switch
        current = get() if callable(get) else None
        if current and any(v not in (None, "grouped_mm") for v in current.values()):
            model.set_experts_implementation("grouped_mm")
            saved = current
    try:
        yield
    finally:
        if saved is not None:
            model.set_experts_implementation(saved)


def _export(model: nn.Module, args: tuple, kwargs: dict) -> ExportedProgram:
    """A dynamic batch dimension where it exports and decomposes; else (any failure in either step) static."""
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=_dynamic_batch(model, args, kwargs),
                                 strict=False)
        return ep.run_decompositions({})
    except Exception:  # noqa: BLE001 - a model that specialises its batch size still exports statically
        ep = torch.export.export(model, args, kwargs, strict=False)
        return ep.run_decompositions({})


def hidden_outputs(ep: ExportedProgram) -> set[int]:
    """Indices of the flat outputs that are hidden states (``last_hidden_state``, ``encoder_last_hidden_state``,
    ``hidden_states``, a tower's nested output) when the model also returns something else (logits, embeddings).

    Those are not what such a model computes for its user but its internals: they are left in the fused model's
    basis rather than fixing the residual stream they carry (T5's encoder, CLIP's towers). A model that returns
    only hidden states (a base model) keeps them fixed: they are its output.
    """
    try:
        spec = ep.call_spec.out_spec
        leaves = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))[0]
    except Exception:  # noqa: BLE001 - an output structure we cannot name: every output stays fixed
        return set()
    hidden = {index for path, index in leaves if "hidden_state" in pytree.keystr(path)
              or "_model_output" in pytree.keystr(path)}
    return hidden if len(hidden) < len(leaves) else set()


def tied_tensors(model: nn.Module) -> dict[str, str]:
    """Tied tensors (two state_dict names, one storage) -> the first name that holds it."""
    first: dict[tuple[int, tuple], str] = {}
    out: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel() == 0:
            continue
        # meta tensors have no storage (every data_ptr is 0): there, tied means one and the same tensor object
        key = (id(tensor) if tensor.is_meta else tensor.data_ptr(), tuple(tensor.shape))
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out
