"""The supported architectures table: what the tracer aligns in each model family of the test zoo, and a few more.

For every family: build the tiny seeded model, make every entry of its state dict random (norm gains, biases,
position tables, BatchNorm statistics), derive its plan with ``build_plan`` and check that ``random_permutation``
keeps the outputs (relative max change; above 1e-4 the row says WRONG: that plan would break a fusion). One
markdown row per family: spaces aligned (with attention heads or conv groups, head groups), state-dict tensors
moved, hidden channels left fixed and why, ops without a tracer rule, and the invariance figure.

    python scripts/supported_architectures.py [--families a,b] [--out FILE] [--threads 1]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test zoo
sys.path.insert(0, str(ROOT))

import hf_otfusion  # noqa: E402, F401 - makes timm importable on CPU-only torch
from hf_otfusion import build_plan, random_permutation  # noqa: E402

TOLERANCE = 1e-4
HEADER = ("| family | library / class | spaces aligned (headed, head groups) | tensors moved / total "
          "| hidden channels left fixed: why | ops without a rule | invariance |")
RULE = "|---|---|---|---:|---|---|---:|"


# ----------------------------------------------------------------------------------------------------------
# Models the issue lists that are not in the zoo: tiny, offline, seconds to build


def _t5() -> tuple[nn.Module, Any]:
    import transformers

    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    gen = torch.Generator().manual_seed(0)
    ids = {"input_ids": torch.randint(0, 64, (2, 7), generator=gen),
           "decoder_input_ids": torch.randint(0, 64, (2, 5), generator=gen)}
    return transformers.T5ForConditionalGeneration(config), ids


def _hf_swin() -> tuple[nn.Module, Any]:
    import transformers

    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                     window_size=4, num_labels=3)
    return transformers.SwinForImageClassification(config), torch.randn(2, 3, 32, 32)


def _clip() -> tuple[nn.Module, Any]:
    import transformers

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=8)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (2, 7), generator=gen)
    ids[:, -1] = 2  # end of text: the pooled token
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(2, 3, 16, 16,
                                                                                               generator=gen)}
    return transformers.CLIPModel(config), x


def _timm(name: str, size: int = 32, **kwargs: object) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=4, **kwargs)
        return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))

    return build


EXTRA: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "hf_t5": _t5,
    "hf_swin": _hf_swin,
    "hf_clip": _clip,
    "timm_regnetx_002": _timm("regnetx_002"),
    "timm_resnext26ts": _timm("resnext26ts"),
    "timm_swin_tiny": _timm("swin_tiny_patch4_window7_224", 64, img_size=64, window_size=2, depths=(1, 1, 1, 1)),
    "timm_levit_128s": _timm("levit_128s", 96, img_size=96),
    "timm_eva02_tiny": _timm("eva02_tiny_patch14_224", 28, img_size=28, depth=2),
    "timm_mobilevit_xxs": _timm("mobilevit_xxs", 64),
}


def families() -> list[str]:
    from zoo import ZOO

    return list(ZOO) + list(EXTRA)


def _build(name: str) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    if name in EXTRA:
        return EXTRA[name]()
    from zoo import make

    return make(name)


def _randomize(model: nn.Module, x: Any, seed: int = 0) -> nn.Module:
    """Every floating state-dict entry random, drawn as zoo.randomize_state draws them (at the scale of the
    fan-in; scalars such as CLIP's logit scale too), except that norm gains are drawn around 1 and BatchNorm
    statistics are those of the batch, each then scaled by a random factor. With gains near 0, or statistics that
    do not fit the signal, a deep CNN's hidden signal dies out (EfficientNet's does), its output no longer depends
    on the hidden channels, and the invariance check could not see a wrong plan."""
    gen = torch.Generator().manual_seed(seed + 7)
    norms = {f"{name}.weight" for name, mod in model.named_modules() if "norm" in type(mod).__name__.lower()}
    with torch.no_grad():
        for key, value in model.state_dict(keep_vars=True).items():
            if not value.is_floating_point():
                continue
            fan_in = value[0].numel() if value.dim() > 1 else max(1, value.numel())
            noise = torch.randn(value.shape, generator=gen)
            gain = key in norms or key.endswith("norm.weight") or "layernorm" in key and key.endswith("weight")
            value.copy_(1 + 0.3 * noise if gain else noise * fan_in**-0.5)
            if key.endswith("running_var"):
                value.copy_(0.5 + torch.rand(value.shape, generator=gen))
        batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if batch_norms:
            momenta = [m.momentum for m in batch_norms]
            for m in batch_norms:
                m.reset_running_stats()
                m.momentum = None  # the statistics of this one batch
            model.train()
            _output(model, x)
            for m, momentum in zip(batch_norms, momenta, strict=True):
                m.momentum = momentum
                m.running_mean.add_(0.3 * m.running_var.sqrt() * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.mul_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


def _output(model: nn.Module, x: Any) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "logits_per_image"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def _double(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _double(v) for k, v in x.items()}
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _library(model: nn.Module) -> str:
    root = type(model).__module__.split(".")[0]
    if root in ("timm", "transformers"):
        return f"{root} `{type(model).__name__}`"
    return f"torch `{type(model).__name__}` (zoo)"


def _short(reason: str, limit: int = 80) -> str:
    """A reason without its node names and shapes (one entry per kind of structure), cut to ``limit``."""
    reason = re.sub(r" ?\((?:op '[^']*' )?\(?node [^)]*\)\)?", "", reason)
    reason = re.sub(r"\[[\d, ]*\]( -> \d+)?", "…", reason)
    reason = " ".join(reason.split()).replace("|", "/")
    reason = reason.replace("the channels inside each head: ", "inside heads: ").replace(
        "the order of the heads: ", "head order: ")
    if len(reason) <= limit:
        return reason
    return reason[: limit - 1].rsplit(" ", 1)[0].rstrip(" ,;:") + "…"


@dataclass
class Row:
    family: str
    library: str
    spaces: str = ""
    moved: str = ""
    fixed: str = ""
    unhandled: str = ""
    invariance: str = ""
    seconds: float = 0.0
    wrong: bool = False

    def markdown(self) -> str:
        cells = (f"`{self.family}`", self.library, self.spaces, self.moved, self.fixed, self.unhandled,
                 self.invariance)
        return "| " + " | ".join(cells) + " |"


def survey(name: str) -> Row:
    """Plan one family with a random state dict and check the permutation invariance."""
    start = time.perf_counter()
    row = Row(name, "?")
    try:
        model, x = _build(name)
        model = _randomize(model, x)
        row.library = _library(model)
        plan = build_plan(model, x)
        permuted = random_permutation(model, plan, seed=1)
        with torch.no_grad():  # in float64: what is left is the plan's error, not float32 round-off
            x64 = _double(x)
            ref, out = _output(model.double(), x64), _output(permuted.double(), x64)
        change = float((out - ref).abs().max() / ref.abs().max())
        spread = float((ref - ref.mean(0)).abs().max() / ref.abs().max())  # does the output depend on the input?
    except Exception as err:  # noqa: BLE001 - the table reports any failure, it does not hide it
        row.spaces = row.moved = row.fixed = row.unhandled = "-"
        row.invariance = f"ERROR: {_short(f'{type(err).__name__}: {err}', 90)}"
        row.wrong, row.seconds = True, time.perf_counter() - start
        return row
    headed = [s for s in plan.spaces if s.heads > 1]
    row.spaces = f"{len(plan.spaces)} ({len(headed)}, {len(plan.head_groups())})"
    state = model.state_dict()
    tensors = [t for t in plan.tensors if t not in plan.aliases and state[t].is_floating_point()]
    moved = {m.tensor for s in plan.spaces for m in s.members}
    row.moved = f"{sum(t in moved for t in tensors)} / {len(tensors)}"
    if plan.fixed:
        reasons: dict[str, int] = {}
        for f in plan.fixed:
            why = _short(f.reason) + (" (no permutation allowed)" if f.necessary else "")
            reasons[why] = reasons.get(why, 0) + 1
        channels = sum(f.size for f in plan.fixed)
        row.fixed = f"{channels} in {len(plan.fixed)}: " + "; ".join(
            f"{why}{f' (x{n})' if n > 1 else ''}" for why, n in reasons.items())
    else:
        row.fixed = "none"
    row.unhandled = ", ".join(f"`{op}`" for op in dict.fromkeys(plan.unhandled)) or "none"
    row.wrong = not change < TOLERANCE  # NaN is wrong too
    row.invariance = f"{'**WRONG** ' if row.wrong else ''}{change:.1e}"
    if not spread > 1e-3:
        row.invariance += " (vacuous: the output ignores the input)"
    row.seconds = time.perf_counter() - start
    return row


def table(names: Sequence[str], log: Callable[[str], None] | None = None) -> tuple[str, list[Row]]:
    rows = []
    for name in names:
        row = survey(name)
        rows.append(row)
        if log is not None:
            log(f"{name}: {row.invariance} ({row.seconds:.1f} s)")
    lines = [HEADER, RULE, *(r.markdown() for r in rows)]
    return "\n".join(lines), rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", help="comma-separated family names (default: all)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--list", action="store_true", help="list the family names and exit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    known = families()
    if args.list:
        print("\n".join(known))
        return 0
    names = [n.strip() for n in args.families.split(",") if n.strip()] if args.families else known
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown families {unknown}; see --list")
    text, rows = table(names, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    wrong = [r.family for r in rows if r.wrong]
    if wrong:
        print(f"{len(wrong)} of {len(rows)} families WRONG or failing: {', '.join(wrong)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
