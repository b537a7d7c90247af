"""Tiny, seeded models of every family the tracer must plan, registered by name (timm-style).

Norm layers get random running statistics so that a wrong permutation of them changes the outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hf_otfusion  # noqa: F401 - makes timm importable on CPU-only torch


@dataclass(frozen=True)
class ZooEntry:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    inputs: Callable[[int, int], Any] | None = None  # (batch, seed) -> model inputs, when not a random tensor


ZOO: dict[str, ZooEntry] = {}


def register(name: str, input_shape: tuple[int, ...], inputs: Callable[[int, int], Any] | None = None) -> Callable:
    def wrap(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        ZOO[name] = ZooEntry(fn, input_shape, inputs)
        return fn

    return wrap


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            with torch.no_grad():
                if getattr(mod, "weight", None) is not None:
                    mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=gen))
                    mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=gen))
                if getattr(mod, "running_mean", None) is not None:
                    mod.running_mean.copy_(0.3 * torch.randn(mod.running_mean.shape, generator=gen))
                    mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=gen))
    return model


def inputs(name: str, batch: int = 4, seed: int = 100) -> Any:
    """A batch of inputs for a family: a random tensor, or (transformers text models) a dict of keyword tensors."""
    entry = ZOO[name]
    if entry.inputs is not None:
        return entry.inputs(batch, seed)
    return torch.randn(batch, *entry.input_shape, generator=torch.Generator().manual_seed(seed))


def make(name: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """A seeded model of the family and a batch of inputs for it."""
    torch.manual_seed(seed)
    entry = ZOO[name]
    model = entry.build()
    if name in DECODERS or name in MOE:
        return randomize_state(model, seed).eval(), inputs(name, 4, seed + 100)
    if name in TRANSFORMERS:
        randomize_weights(model, seed)
    model = randomize_norms(model, seed).eval()
    return model, inputs(name, 4, seed + 100)


def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random at the scale of its fan-in (biases and tokens too, unlike the zero/tiny inits)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.numel() // p.shape[0] if p.dim() > 1 and p.shape[0] > 1 else p.shape[-1]
            scale = 0.1 if p.dim() == 1 else fan_in**-0.5
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


def run(model: nn.Module, x: Any) -> torch.Tensor:
    """The model's output tensor (its logits for transformers models) on a tensor or a dict of keyword tensors."""
    out = model(**x) if isinstance(x, dict) else model(x)
    return getattr(out, "logits", out)


@register("mlp", (20,))
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 24), nn.GELU(), nn.Dropout(0.1), nn.Linear(24, 5))


def _vgg(bn: bool) -> nn.Module:
    layers: list[nn.Module] = []
    c_in = 3
    for c in (8, "M", 16, "M", 16):
        if c == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers.append(nn.Conv2d(c_in, c, 3, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(c))
        layers.append(nn.ReLU())
        c_in = c
    # flatten after a conv: the classifier's input is the last space repeated once per position
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 4))


@register("vgg", (3, 16, 16))
def vgg() -> nn.Module:
    return _vgg(bn=False)


@register("vgg_bn", (3, 16, 16))
def vgg_bn() -> nn.Module:
    return _vgg(bn=True)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)  # in place, as torchvision/timm write it
        return F.relu(out)


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * 4
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block: type[nn.Module], widths: tuple[int, ...], expansion: int, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        blocks, c_in = [], 8
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks += [block(c_in, w, stride), block(w * expansion, w, 1)]
            c_in = w * expansion
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register("resnet_basic", (3, 16, 16))
def resnet_basic() -> nn.Module:
    return ResNet(BasicBlock, (8, 16), expansion=1)


@register("resnet_bottleneck", (3, 16, 16))
def resnet_bottleneck() -> nn.Module:
    return ResNet(Bottleneck, (4, 8), expansion=4)


class MBBlock(nn.Module):
    """Inverted residual: expand, depthwise, squeeze-excitation gate, project (+ identity)."""

    def __init__(self, c: int, expand: int):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        self.se_reduce = nn.Conv2d(h, max(2, h // 4), 1)
        self.se_expand = nn.Conv2d(max(2, h // 4), h, 1)
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(self.expand(x))
        gate = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        return x + self.project(h * gate)


@register("mobilenet_se", (3, 16, 16))
def mobilenet_se() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.Hardswish(),
        # depthwise with a channel multiplier of 2: each input channel feeds two outputs
        nn.Conv2d(8, 16, 3, 1, 1, groups=8, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        nn.Conv2d(16, 8, 1, bias=False),
        nn.BatchNorm2d(8),
        MBBlock(8, 3),
        MBBlock(8, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(8, 4),
    )


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


@register("densenet", (3, 16, 16))
def densenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False),
        DenseLayer(8, 4),
        DenseLayer(12, 4),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 8, 1, bias=False),
        nn.AvgPool2d(2),  # transition
        DenseLayer(8, 4),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 4),
    )


@register("groupnorm_cnn", (3, 8, 8))
def groupnorm_cnn() -> nn.Module:
    # GroupNorm with 1 group (free), with 2 groups (the groups are heads), LayerNorm MLP head
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(1, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.LayerNorm(16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def _timm(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=4, **kwargs)

    return build


register("timm_resnet18", (3, 32, 32))(_timm("resnet18"))
register("timm_resnet50", (3, 32, 32))(_timm("resnet50"))
register("timm_vgg11", (3, 32, 32))(_timm("vgg11"))
register("timm_mobilenetv3", (3, 32, 32))(_timm("mobilenetv3_small_050"))
register("timm_efficientnet_b0", (3, 32, 32))(_timm("efficientnet_b0"))
register("timm_densenet121", (3, 32, 32))(_timm("densenet121"))



# ----------------------------------------------------------------------------------------------------------
# Transformers: attention heads, LayerNorm, residual stream, class/position/token embeddings


def _vit_timm(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    # small images and patches, two blocks; the widths and head counts of the real architecture
    return _timm(name, img_size=32, patch_size=8, depth=2, **kwargs)


register("timm_vit", (3, 32, 32))(_vit_timm("vit_tiny_patch16_224"))  # fused qkv, class token, pos_embed
@register("timm_vit_eager", (3, 32, 32))
def timm_vit_eager() -> nn.Module:
    model = _vit_timm("vit_tiny_patch16_224")()
    for block in model.blocks:
        block.attn.fused_attn = False  # q @ k^T, softmax, @ v instead of scaled_dot_product_attention
    return model


register("timm_deit_distilled", (3, 32, 32))(_vit_timm("deit_tiny_distilled_patch16_224"))  # dist token, 2 heads


def _hf_vit(attn: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=48, num_labels=5, initializer_range=0.2,
                           attn_implementation=attn)
        return ViTForImageClassification(config)

    return build


def text_inputs(batch: int, seed: int, vocab: int = 50, length: int = 7) -> dict[str, torch.Tensor]:
    """Token ids with padding at the end of every other sequence, and two token types."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1::2, length - 2 :] = 0
    ids[mask == 0] = 0
    types = torch.zeros(batch, length, dtype=torch.long)
    types[:, length // 2 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _bert(attn: str, head: str = "classification") -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

        config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=16, num_labels=3, initializer_range=0.2,
                            attn_implementation=attn)
        return BertForMaskedLM(config) if head == "mlm" else BertForSequenceClassification(config)

    return build


register("hf_vit_sdpa", (3, 16, 16))(_hf_vit("sdpa"))
register("hf_vit_eager", (3, 16, 16))(_hf_vit("eager"))
register("hf_bert_sdpa", (7,), text_inputs)(_bert("sdpa"))
register("hf_bert_eager", (7,), text_inputs)(_bert("eager"))
register("hf_bert_mlm", (7,), text_inputs)(_bert("sdpa", "mlm"))  # decoder tied to the word embeddings

@register("hf_gpt2", (7,), lambda batch, seed: {"input_ids": text_inputs(batch, seed)["input_ids"]})
def hf_gpt2() -> nn.Module:
    # Conv1D (addmm, W stored (in, out)), c_attn split into q, k, v, causal mask, LM head tied to the embeddings
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0, use_cache=False)
    return GPT2LMHeadModel(config)


class HeadScaledAttention(nn.Module):
    """One attention block with a learned temperature per head: a per-head parameter moves with the heads."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens_in: int = 6, classes: int = 3):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(tokens_in, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, d = x.shape
        q, k, v = (f(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(-1)
        x = x + self.o((attn @ v).transpose(1, 2).reshape(b, n, d))
        return self.head(self.norm(x).mean(1))


register("head_scaled_attention", (5, 6))(HeadScaledAttention)

TRANSFORMERS = ["head_scaled_attention", "timm_vit", "timm_vit_eager", "timm_deit_distilled", "hf_vit_sdpa",
                "hf_vit_eager", "hf_bert_sdpa", "hf_bert_eager", "hf_bert_mlm", "hf_gpt2"]
SMALL = [n for n in ZOO if not n.startswith("timm_") and n not in TRANSFORMERS]  # (decoders register below)
TIMM = [n for n in ZOO if n.startswith("timm_") and n not in TRANSFORMERS]


# ----------------------------------------------------------------------------------------------------------
# Decoder LLMs with their default configs (key/value cache on): grouped-query and multi-query attention, rotary
# embeddings (full and partial), q/k norms, qkv biases, a per-head fused qkv, SwiGLU


def _token_ids(batch: int, seed: int, vocab: int = 64, length: int = 8) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))}


def _decoder(kind: str, **extra: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        config = getattr(transformers, f"{kind}Config")(**common, **extra)
        return getattr(transformers, f"{kind}ForCausalLM")(config)

    return build


DECODER_FAMILIES = {
    "llama_gqa": _decoder("Llama", num_key_value_heads=2),
    "llama_mha": _decoder("Llama", num_key_value_heads=4, attention_bias=True),
    "mistral_gqa": _decoder("Mistral", num_key_value_heads=2),
    "qwen2_gqa_bias": _decoder("Qwen2", num_key_value_heads=2),
    "qwen3_qk_norm": _decoder("Qwen3", num_key_value_heads=2, head_dim=8),
    "gemma_mqa": _decoder("Gemma", num_key_value_heads=1, head_dim=8),
    "gpt_neox_partial_rotary": _decoder("GPTNeoX", rotary_pct=0.5),
    "phi_partial_rotary": _decoder("Phi", num_key_value_heads=2, partial_rotary_factor=0.5),
    # one fused qkv_proj sliced into q, k, v (not per head), GQA, and an empty pass-through slice of its rotary
    "phi3_fused_qkv_gqa": _decoder("Phi3", num_key_value_heads=2),
}
for _name, _build in DECODER_FAMILIES.items():
    register(_name, (8,), _token_ids)(_build)
DECODERS = list(DECODER_FAMILIES)


def _moe(kind: str, **extra: object) -> Callable[[], nn.Module]:
    """A mixture-of-experts decoder whose experts run their eager loop (any dtype; the tracer exports grouped_mm)."""
    def build() -> nn.Module:
        model = _decoder(kind, num_key_value_heads=2, **extra)()
        model.set_experts_implementation("eager")
        return model

    return build


# experts stacked [experts, out, in] behind a top-k router; Qwen2-MoE adds a gated shared expert, gpt-oss biases
# everywhere and an interleaved, clamped gate/up
MOE_FAMILIES = {
    "mixtral_moe": _moe("Mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe_shared": _moe("Qwen2Moe", moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
                             num_experts_per_tok=2),
    "qwen3_moe": _moe("Qwen3Moe", moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8),
    "olmoe": _moe("Olmoe", num_experts=4, num_experts_per_tok=2),
    "gpt_oss": _moe("GptOss", num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"]),
}
for _name, _build in MOE_FAMILIES.items():
    register(_name, (8,), _token_ids)(_build)
MOE = list(MOE_FAMILIES)


def randomize_state(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every floating entry of the state dict random, so that a wrong permutation of any of them changes the
    outputs: weights at the scale of their fan-in, norm gains around 1 (so the signal lives through deep nets),
    biases and tables small, running variances positive; non-persistent buffers (rotary tables) are left alone."""
    gen = torch.Generator().manual_seed(seed + 7)
    norms = {name for name, mod in model.named_modules() if "norm" in type(mod).__name__.lower()}
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            owner, _, leaf = name.rpartition(".")
            noise = torch.randn(tensor.shape, generator=gen)
            if owner in norms and leaf == "weight":
                tensor.copy_(1 + 0.3 * noise)
            elif leaf == "running_var":
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif owner in norms or tensor.dim() <= 1:
                tensor.copy_(0.1 * noise)
            else:
                tensor.copy_(noise * (tensor[0].numel() ** -0.5))
    return model


def live_batch_norms(model: nn.Module, x: Any, seed: int = 0) -> nn.Module:
    """BatchNorm running statistics taken from a batch, then moved at random (each channel its own): the signal
    stays alive through deep nets (random statistics alone can leave a constant output, and a permutation test
    on a constant proves nothing), and a wrong permutation of the statistics still changes the outputs."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None  # a cumulative average: one batch sets the statistics
        m.reset_running_stats()
    model.train()
    with torch.no_grad():
        run(model, x)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 13)
    with torch.no_grad():
        for m in bns:
            std = m.running_var.sqrt()
            m.running_mean.add_(0.2 * std * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.mul_(0.7 + 0.6 * torch.rand(m.running_var.shape, generator=gen))
    return model


def assert_states_close(a: nn.Module, b: nn.Module, tol: float = 1e-4) -> None:
    """Every floating entry of two state dicts close (each tensor relative to its own largest entry)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if value.is_floating_point():
            torch.testing.assert_close(sb[key], value, rtol=tol, atol=tol * max(value.abs().max().item(), 1e-6),
                                       msg=lambda m, key=key: f"{key}: {m}")


def moved_from(fused: nn.Module, target: nn.Module) -> bool:
    """Whether some entry of ``fused``'s state dict differs from the target's (a fuse that did work)."""
    state = fused.state_dict()
    return any(not torch.equal(v, state[k]) for k, v in target.state_dict().items())
