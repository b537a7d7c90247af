"""Parents' tokenizers compared before a merge: embedding rows are averaged by token id, so parents whose
tokenizers map ids to different tokens would be merged into nonsense, even with equal vocabulary sizes."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from .errors import TokenizerMismatchError
from .sources import ModelInfo


def _signature(info: ModelInfo) -> dict[str, Any] | None:
    """The vocabulary (token -> id) and special tokens of a parent's tokenizer; None when it has none."""
    if info.library != "transformers":
        return None
    from transformers import AutoTokenizer

    with contextlib.suppress(Exception):  # no tokenizer files (a vision model), or none transformers can read
        tokenizer = AutoTokenizer.from_pretrained(str(info.model_dir), trust_remote_code=False)
        special = {name: getattr(tokenizer, name, None) for name in
                   ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "sep_token", "cls_token")}
        return {"vocab": tokenizer.get_vocab(), "special": {k: str(v) for k, v in special.items() if v is not None}}
    return None


def _difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    if a["vocab"] != b["vocab"]:
        if len(a["vocab"]) != len(b["vocab"]):
            return f"{len(a['vocab'])} tokens against {len(b['vocab'])}"
        moved = sorted(t for t in a["vocab"] if b["vocab"].get(t) != a["vocab"][t])
        return f"{len(moved)} of {len(a['vocab'])} tokens differ (e.g. {moved[0]!r})"
    if a["special"] != b["special"]:
        keys = sorted(k for k in {*a["special"], *b["special"]} if a["special"].get(k) != b["special"].get(k))
        return "special tokens differ: " + ", ".join(
            f"{k} {a['special'].get(k)!r} against {b['special'].get(k)!r}" for k in keys)
    return None


def check_tokenizers(parents: Sequence[ModelInfo], target: int, tokenizer_source: str | None) -> None:
    """Refuse parents whose tokenizers differ from the target's (vocabulary or special tokens), unless
    ``tokenizer_source`` says which tokenizer the output keeps (``"base"``: the target's)."""
    if tokenizer_source is not None:
        return
    signatures: dict[str, dict[str, Any] | None] = {}
    for info in parents:
        if info.ref.text not in signatures:
            signatures[info.ref.text] = _signature(info)
    reference = signatures[parents[target].ref.text]
    if reference is None:
        return
    for info in parents:
        theirs = signatures[info.ref.text]
        problem = _difference(reference, theirs) if theirs is not None else None
        if problem is not None:
            raise TokenizerMismatchError(
                f"{info.ref.text} has another tokenizer than the target {parents[target].ref.text} ({problem}): "
                "their embedding rows do not mean the same tokens. Merge parents that share a tokenizer, or write "
                "`tokenizer_source: base` in the config to keep the target's tokenizer anyway")
