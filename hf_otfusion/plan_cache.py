"""A cache of traced alignment plans on disk, so the second merge of an architecture does not trace it again.

Tracing (``torch.export`` plus the rule walk) costs seconds per architecture and gives the same plan every time for
the same model: :func:`cached_plan` stores the plan of a model the first time and reads it back after that.

Where: ``$HF_OTFUSION_PLAN_CACHE`` when set, else ``hf_otfusion/plans/`` under the Hugging Face cache folder
(``huggingface_hub.constants.HF_HOME``, ``~/.cache/huggingface`` by default). One JSON file per entry, named by the
SHA-256 of its key; the file holds the key's fields too, and an entry whose stored fields differ from the asked
ones is not used.

The key: the library (timm, transformers); the architecture (the timm model name or transformers class, and the
module class); the config that shapes the model (transformers ``config.to_dict()``; timm's ``config.json`` with its
``model_args`` and the model's ``pretrained_cfg``), less the fields that only name things (``_name_or_path``, label
names, Hub ids, local paths, licences), record versions (``transformers_version``) or the storage ``dtype``; the
example input's signature (the names, dtypes and shapes of its tensors, batch dimension left out, and their
device type: a plan traced on the ``meta`` device and one traced on weights are different entries); every
state-dict tensor's name, shape and dtype, and the tied tensors; the tracer's rules (every registered rule's name
and code) and a digest of the tracer's and the verifier's source files; the versions of hf_otfusion, torch and
the library.

What an entry holds: the *verified* plan (:mod:`hf_otfusion.verify`: checked once on a randomised copy of the model,
repaired where a random permutation by it changed the outputs) with its verdict (``plan.verification``), so a plan
read back is never checked again.

Invalidation rule: **any change in any of the key's fields makes a new entry**; entries are never mutated (a plan
is written once, atomically: a temporary file in the folder, then a rename) and never expire. Deleting the folder,
or any file in it, is always safe: the next merge traces and writes the entry again. An entry that cannot be read
or parsed is ignored with a one-line warning on stderr and the model is traced (and the entry rewritten); a
folder that cannot be written to is warned about once per call and the merge goes on. ``--no-plan-cache`` on
``merge``, ``align`` and ``plan`` (``plan_cache=False`` in Python) neither reads nor writes the cache.

What it saves: the plan build. A weights-mode merge then runs no export at all. A caller that needs no activation
sites (``sites=False``: the merge streamed from disk) has a deep transformers model traced on a shallow copy and
expanded by layer index on a miss (:mod:`hf_otfusion.trace.expand`), stored under the key plus ``expanded``. An
activations-mode merge still exports the target, because the engine records activations on the exported graph;
there the cache saves only the tracer's walk and its own export.

A rule registered with :func:`~hf_otfusion.trace.register_rule` is part of the key by name, module and code; a rule
whose behaviour depends on anything else (a global it reads) is not seen: use ``--no-plan-cache`` while developing
one, or delete the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from types import CodeType
from typing import Any

import torch
from torch import nn

from .log import get_logger
from .plan import AlignmentPlan

log = get_logger(__name__)

ENV_VAR = "HF_OTFUSION_PLAN_CACHE"
FORMAT = 1  # the layout of an entry file; part of the key

# config fields that name, locate or date a model, or say how its weights are stored: they do not shape the graph
_UNSHAPING = frozenset({
    "_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "torch_dtype", "dtype",
    "id2label", "label2id", "label_names", "file", "source", "url", "hf_hub_id", "hf_hub_filename",
    "hf_hub_revision", "license", "tag",
})


def cache_dir() -> Path:
    """The cache folder: ``$HF_OTFUSION_PLAN_CACHE``, else ``<HF_HOME>/hf_otfusion/plans``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "hf_otfusion" / "plans"


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON (dict keys sorted by the dump; tuples as lists; anything else by its ``repr``)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items() if str(k) not in _UNSHAPING}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    return repr(value)


def _signature(x: Any) -> Any:
    """Names, dtypes, device types and shapes (less the batch dimension) of an example input's tensors."""
    if isinstance(x, torch.Tensor):
        return {"dtype": str(x.dtype), "device": x.device.type, "shape": list(x.shape[1:])}
    if isinstance(x, Mapping):
        return {str(k): _signature(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_signature(v) for v in x]
    return _jsonable(x)


def model_config(model: nn.Module, library: str | None, config: Mapping | None = None) -> Any:
    """The config that shapes ``model``, as the key holds it (see the module docstring)."""
    if library == "transformers" or hasattr(getattr(model, "config", None), "to_dict"):
        found = model.config.to_dict()  # the attention implementation (eager, sdpa) changes the graph's ops
        found["_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        return _jsonable(found)
    return _jsonable({"config": dict(config or {}), "pretrained_cfg": getattr(model, "pretrained_cfg", None)})


def _code_text(value: Any) -> str:
    """A stable text of a code object and its constants (no memory addresses, sets in sorted order)."""
    if isinstance(value, CodeType):
        return f"code({value.co_code.hex()},{value.co_names},{_code_text(value.co_consts)})"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(map(_code_text, value)) + ")"
    if isinstance(value, (set, frozenset)):
        return "{" + ",".join(sorted(map(_code_text, value))) + "}"
    return repr(value)


def _code_digest(fn: Any) -> str:
    """A rule's identity: its module, name and code (a rule edited in place gets another digest)."""
    code = getattr(fn, "__code__", None)
    parts = [getattr(fn, "__module__", ""), getattr(fn, "__qualname__", type(fn).__qualname__)]
    if code is not None:
        parts.append(_code_text(code))
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def _tracer_source() -> str:
    """A digest of the tracer's, the plan's and the verifier's source files (an edited checkout without a new
    version misses)."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted([here / "plan.py", here / "verify.py", *(here / "trace").rglob("*.py")]):
        digest.update(path.relative_to(here).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _versions(library: str | None) -> dict[str, str | None]:
    from . import __version__

    found = {"hf_otfusion": __version__, "torch": torch.__version__}
    for name in ("timm", "transformers") if library is None else (library,):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    return found


def plan_key(model: nn.Module, example: Any, *, library: str | None = None, architecture: str | None = None,
             config: Mapping | None = None) -> dict[str, Any]:
    """The fields a cached plan is keyed by (see the module docstring); their hash names the entry."""
    from .trace import RULES, STACK_RULES, tied_tensors

    state = model.state_dict(keep_vars=True)
    return {
        "format": FORMAT,
        "library": library,
        "architecture": architecture,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": model_config(model, library, config),
        "input": _signature(example),
        "tensors": [[name, list(t.shape), str(t.dtype)] for name, t in state.items()],
        "tied": _jsonable(tied_tensors(model)),
        "rules": sorted([name, _code_digest(fn)] for name, fn in RULES.items()),
        "stack_rules": [_code_digest(fn) for fn in STACK_RULES],
        "tracer": _tracer_source(),
        "versions": _versions(library),
    }


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _warn(text: str) -> None:
    log.warning("plan cache: %s", text)


def read_entry(path: Path, key: Mapping[str, Any]) -> AlignmentPlan | None:
    """The plan stored at ``path`` for ``key``; None when there is none, or (with a warning) when it is unreadable."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # no entry (or no folder) yet
        return None
    except OSError as err:
        _warn(f"cannot read {path} ({err.strerror or err}); tracing again")
        return None
    try:
        entry = json.loads(data.decode("utf-8"))  # a binary entry is a bad entry too (UnicodeDecodeError)
        if json.loads(json.dumps(key)) != entry["key"]:
            raise ValueError("its key is not the one asked for")
        return AlignmentPlan.model_validate(entry["plan"])
    except Exception as err:  # noqa: BLE001 - any bad entry is ignored, whatever is wrong with it
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        _warn(f"ignoring the unreadable entry {path} ({reason[:120]}); tracing again")
        return None


def write_entry(path: Path, key: Mapping[str, Any], plan: AlignmentPlan) -> None:
    """Store ``plan`` at ``path``, atomically: a new temporary file in the same folder (its mode from the umask, as
    any file the user writes), then a rename over ``path``. A failure is one warning; the merge goes on."""
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(8)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # not sort_keys: the plan's mappings keep their order (the tensors' order is the checkpoint's)
        text = json.dumps({"key": key, "plan": json.loads(plan.to_json(indent=None))})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        _warn(f"cannot write {path} ({err.strerror or err}); the plan is not cached")
    finally:
        with contextlib.suppress(OSError):  # gone after the rename; or never made
            tmp.unlink(missing_ok=True)


def cached_plan(model: nn.Module, example: Any, *, library: str | None = None, architecture: str | None = None,
                config: Mapping | None = None, enabled: bool = True, sites: bool = True,
                verify_input: Any = None) -> AlignmentPlan:
    """``build_plan(model, example)``, read from the plan cache when an entry for this model and input exists, and
    stored there when it does not. ``enabled=False``: trace, and neither read nor write the cache.

    ``sites=False``: the caller needs no activation sites (weights-mode fusion without repair), so a deep
    transformers model may be traced on a shallow copy and expanded by layer index
    (:func:`~hf_otfusion.trace.expanded_plan`, much faster), else it is traced in full. A full plan serves either
    use, so its entry is read first; an expanded plan is stored under its own key (the key plus ``expanded``).

    Every plan is verified once (:func:`~hf_otfusion.verify.verify_plan`: checked on a randomised copy of
    ``model`` and repaired where it is wrong) and stored with its verdict, so an entry read back is not checked
    again (an entry written before verification existed is checked and rewritten). ``verify_input``: the example
    on a real device, for a plan traced on the ``meta`` device (``example`` is then a meta tensor).

    ``library``, ``architecture`` and ``config`` are what :class:`~hf_otfusion.sources.ModelInfo` says of the model.
    """
    if not enabled:
        return _verified(model, _build(model, example, sites), example, verify_input)
    key = plan_key(model, example, library=library, architecture=architecture, config=config)
    plan = read_entry(cache_dir() / f"{key_hash(key)}.json", key)
    expanded_key = {**key, "expanded": True}
    if plan is None and not sites:
        plan = read_entry(cache_dir() / f"{key_hash(expanded_key)}.json", expanded_key)
    if plan is None:
        plan = _build(model, example, sites)
    if plan.verification is None:  # a fresh plan (or an entry from before verification): checked, then stored
        plan = _verified(model, plan, example, verify_input)
        key = expanded_key if plan.expanded else key
        write_entry(cache_dir() / f"{key_hash(key)}.json", key, plan)
    return plan


def _verified(model: nn.Module, plan: AlignmentPlan, example: Any, verify_input: Any) -> AlignmentPlan:
    from .verify import verify_plan

    return verify_plan(model, plan, example if verify_input is None else verify_input)


def _build(model: nn.Module, example: Any, sites: bool) -> AlignmentPlan:
    from . import trace

    plan = None if sites else trace.expanded_plan(model, example)
    return plan if plan is not None else trace.build_plan(model, example)


def cached_plan_of(loaded: Any, example: Any, *, enabled: bool = True, sites: bool = True,
                   verify_input: Any = None) -> AlignmentPlan:
    """:func:`cached_plan` of a :class:`~hf_otfusion.sources.LoadedModel` (verified, see there)."""
    return cached_plan(loaded.model, example, library=loaded.library, architecture=loaded.architecture,
                       config=loaded.config, enabled=enabled, sites=sites, verify_input=verify_input)
