"""Tiny seeded checkpoints saved in their library's own format, for the source, merge and CLI tests."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from transformers import (
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

IMAGE = 16  # side of the images of every tiny model here


def timm_resnet(folder: Path, seed: int, width: int = 1) -> Path:
    """timm ``test_resnet`` (3x16x16 inputs, 10 classes) saved with ``save_for_hf``."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=10, channels=(16 * width, 24, 32, 48)).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, IMAGE, IMAGE), "crop_pct": 1.0}
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    return folder


def timm_vgg_like(folder: Path, seed: int) -> Path:
    """A timm model of another architecture (``test_efficientnet``)."""
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", num_classes=10).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, IMAGE, IMAGE), "crop_pct": 1.0}
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    return folder


def _processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def hf_vit(folder: Path, seed: int) -> Path:
    """transformers ``ViTForImageClassification`` (2 layers, 2 heads, 4 labels) with its image processor."""
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=IMAGE, patch_size=8, num_labels=4)
    ViTForImageClassification(config).eval().save_pretrained(folder)
    _processor().save_pretrained(folder)
    return folder


def hf_resnet(folder: Path, seed: int) -> Path:
    """transformers ``ResNetForImageClassification`` (2 stages, 4 labels) with an image processor."""
    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=4)
    ResNetForImageClassification(config).eval().save_pretrained(folder)
    _processor().save_pretrained(folder)
    return folder


def hf_bert(folder: Path, seed: int) -> Path:
    """transformers ``BertForSequenceClassification`` (2 layers, 2 heads, 3 labels) with a WordPiece tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    vocab = folder / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(35)]
    vocab.write_text("\n".join(words) + "\n")
    BertTokenizer(vocab_file=str(vocab)).save_pretrained(folder)
    return folder
