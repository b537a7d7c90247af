"""The models of the registry zoo (``scripts/zoo_report.py``): every torchvision classifier, a seeded sample of timm
architectures and every transformers family a generic config shrink can build tiny.

Each builder returns ``(model, example_input, note)`` with random init, at a small input size where the model
accepts one; :func:`params` counts a model's parameters on the ``meta`` device (nothing allocated), so models over
the parameter budget are skipped before they are built.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import hf_otfusion  # noqa: F401 - makes torchvision and timm importable on CPU-only torch

Built = tuple[nn.Module, Any, str]
BATCH = 2  # export bakes the batch into views: at least 2
SMALL = 64  # the input side tried first for image models


def _images(size: int, channels: int = 3) -> torch.Tensor:
    return torch.randn(BATCH, channels, size, size, generator=torch.Generator().manual_seed(0))


def _runs(model: nn.Module, x: Any) -> bool:
    try:
        with torch.no_grad():
            model.eval()(**x) if isinstance(x, dict) else model.eval()(x)
        return True
    except Exception:  # noqa: BLE001 - the caller tries the next input size
        return False


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def params(make: Callable[[], nn.Module]) -> int | None:
    """Parameters of ``make()`` built on the meta device (None where that fails)."""
    try:
        with torch.device("meta"):
            return _count(make())
    except Exception:  # noqa: BLE001 - counted after the real build instead
        return None


# ----------------------------------------------------------------------------------------------------------
# torchvision


def torchvision_names() -> list[str]:
    """Every classification model of ``torchvision.models`` (not detection, segmentation, video, optical flow)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def _torchvision_kwargs(name: str, size: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_classes": 4}
    if name in ("googlenet", "inception_v3"):
        kw["aux_logits"] = False
        kw["init_weights"] = True
    if name.startswith("vit_"):
        kw["image_size"] = size
    return kw


def torchvision_make(name: str, size: int | None = None) -> Callable[[], nn.Module]:
    import torchvision.models as tvm

    side = size if size is not None else 56 if name.endswith("_14") else SMALL
    return lambda: tvm.get_model(name, **_torchvision_kwargs(name, side))


def build_torchvision(name: str) -> Built:
    """A torchvision classifier at 64 x 64 (56 for ViTs with 14-pixel patches), else 224 x 224."""
    first = 56 if name.endswith("_14") else SMALL
    for size in (first, 224):
        model = torchvision_make(name, size)()
        x = _images(size)
        if _runs(model, x):
            return model, x, f"{size}px"
    raise RuntimeError("no input size runs (64, 224)")


# ----------------------------------------------------------------------------------------------------------
# timm


def timm_sample(n: int, seed: int, budget: float, count: Callable[[str], int | None]) -> tuple[list[str], list[str]]:
    """The first ``n`` architectures of timm's list, shuffled with ``seed``, within ``budget`` parameters (counted
    on meta by ``count``), and those passed over for their size on the way."""
    import timm

    names = sorted(timm.list_models())
    random.Random(seed).shuffle(names)
    picked: list[str] = []
    over: list[str] = []
    for name in names:
        if len(picked) >= n:
            break
        p = count(name)
        (over if p is not None and p > budget else picked).append(name)
    return picked, over


def timm_make(name: str, **kw: Any) -> Callable[[], nn.Module]:
    import timm

    return lambda: timm.create_model(name, pretrained=False, num_classes=4, **kw)


def build_timm(name: str) -> Built:
    """A timm model at ``img_size`` 64 (56) where it takes one, else at a 64-pixel input, else at its default."""
    import timm

    default = timm.get_pretrained_cfg(name)
    side = int(getattr(default, "input_size", (3, 224, 224))[-1]) if default is not None else 224
    tries: list[tuple[dict[str, Any], int]] = [({"img_size": SMALL}, SMALL), ({"img_size": 56}, 56), ({}, SMALL),
                                               ({}, side)]
    errors = []
    for kw, size in tries:
        try:
            model = timm_make(name, **kw)()
        except Exception as err:  # noqa: BLE001 - the next way of building it
            errors.append(f"{type(err).__name__}: {str(err)[:80]}")
            continue
        x = _images(size)
        if _runs(model, x):
            return model, x, f"{size}px" + (" img_size" if kw else "")
    raise RuntimeError(f"no input size runs (64, 56, {side}): {errors[-1] if errors else 'forward fails'}")


# ----------------------------------------------------------------------------------------------------------
# transformers

HEADS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
         "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
         "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES")
VOCAB = 128
# generic shrink: config key -> tiny value (only keys the family's config has are set)
SHRINK: dict[str, int] = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "embed_dim": 32, "dim": 32, "hidden_dim": 64, "n_embed": 32,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "d_kv": 8, "attention_head_dim": 8,
    "intermediate_size": 64, "ffn_dim": 64, "d_ff": 64, "n_inner": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "n_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_decoder_layers": 2, "num_encoder_layers": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_topk": 2,
    "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "time_step_rank": 8, "mamba_n_heads": 4,
    "mamba_d_head": 16, "mamba_head_dim": 16, "n_groups": 1, "mamba_n_groups": 1,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "image_size": 32, "patch_size": 8, "window_size": 2, "max_position_embeddings": 256, "n_positions": 256,
    "projection_dim": 16,
}
# the few families whose configs tie sizes the generic shrink sets apart (Mamba-2: heads * head_dim = expand * hidden)
FAMILY: dict[str, dict[str, Any]] = {"mamba2": {"num_heads": 8}}
TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "decoder_start_token_id",
          "mask_token_id", "unk_token_id")


def transformers_families() -> dict[str, str]:
    """Every model type with a text or image head (causal LM, seq2seq LM, image classification, masked LM, sequence
    classification, in that order of preference) -> its class name."""
    from transformers.models.auto import modeling_auto

    out: dict[str, str] = {}
    for mapping in HEADS:
        for kind, cls in getattr(modeling_auto, mapping).items():
            out.setdefault(kind, cls if isinstance(cls, str) else cls[0])
    return dict(sorted(out.items()))


def _shrink(d: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """The keys of a config dict to override: the sizes of :data:`SHRINK`, list sizes, sub-configs shrunk too."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and depth < 2 and ("model_type" in value or "hidden_size" in value):
            out[key] = {**value, **_shrink(value, depth + 1)}
        elif key in SHRINK and isinstance(value, int) and not isinstance(value, bool):
            out[key] = min(value, SHRINK[key]) if "heads" not in key else min(value, SHRINK[key])
        elif key == "vocab_size" and isinstance(value, int):
            out[key] = min(value, VOCAB)
        elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            n = len(value)
            if any(w in key for w in ("depth", "layers")) and n <= 8:
                out[key] = [1] * n
            elif any(w in key for w in ("hidden_sizes", "embed_dim", "dims", "widths", "channels")) and n <= 8:
                out[key] = [16 * 2**i for i in range(n)]
            elif "heads" in key and n <= 8:
                out[key] = [2] * n
    if isinstance(d.get("layer_types"), list) and d["layer_types"]:
        kinds = list(dict.fromkeys(d["layer_types"]))  # one layer of each kind (a hybrid keeps its mix)
        layers = max(2, len(kinds))
        out["layer_types"] = (kinds * layers)[:layers]
        for key in ("num_hidden_layers", "num_layers"):
            if key in d:
                out[key] = layers
    for key in TOKENS:
        if isinstance(d.get(key), int) and d[key] >= VOCAB and "vocab_size" in out:
            out[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(key, 3)
    return out


def _config(kind: str) -> Any:
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[kind]
    default = cls()
    config = cls(**{**default.to_dict(), **_shrink(default.to_dict()), **FAMILY.get(kind, {})})
    if getattr(config, "pad_token_id", None) is None and hasattr(config, "vocab_size"):
        config.pad_token_id = 0  # sequence classification picks each sequence's last non-pad token
    for attr in ("use_cache", "output_attentions", "output_hidden_states"):
        if hasattr(config, attr):
            setattr(config, attr, False)
    return config


def _inputs(model: nn.Module, config: Any) -> Any:
    gen = torch.Generator().manual_seed(0)
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        vocab = int(getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None),
                                                                   "vocab_size", VOCAB))
        x: dict[str, Any] = {"input_ids": torch.randint(3, max(4, vocab), (BATCH, 8), generator=gen)}
        if getattr(config, "is_encoder_decoder", False):
            x["decoder_input_ids"] = torch.randint(3, max(4, vocab), (BATCH, 5), generator=gen)
        return x
    if name == "pixel_values":
        sub = getattr(config, "vision_config", None) or config
        size = getattr(sub, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return {"pixel_values": _images(int(size), int(getattr(sub, "num_channels", 3)))}
    raise ValueError(f"input {name!r} is neither token ids nor pixels")


def build_transformers(kind: str) -> Built:
    """A family's preferred head class with its default config shrunk generically (random init)."""
    import transformers

    cls = getattr(transformers, transformers_families()[kind])
    config = _config(kind)
    try:
        model = cls._from_config(config, attn_implementation="eager")
    except Exception:  # noqa: BLE001 - a family without eager attention: its default
        model = cls._from_config(config)
    x = _inputs(model, config)
    return model.eval(), x, cls.__name__


def transformers_make(kind: str) -> Callable[[], nn.Module]:
    import transformers

    cls = getattr(transformers, transformers_families()[kind])
    return lambda: cls._from_config(_config(kind))
