"""Tiny language models and a byte-level tokenizer, built offline (no download), for tests.

``byte_tokenizer()`` maps each UTF-8 byte to one token (ids 0-255 through GPT-2's byte-to-unicode alphabet) and adds
``<pad>``, ``<s>``, ``</s>`` and ``<mask>`` after them; ``tiny_llama`` / ``tiny_bert_mlm`` save a seeded random
model with that tokenizer in a folder, as ``save_pretrained`` does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<mask>")
VOCAB_SIZE = 256 + len(SPECIALS)


def byte_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with a fixed 256-byte vocabulary (no merges) plus ``SPECIALS`` (ids 256-259)."""
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
