"""Time a full trace of a deep Llama against the depth-expanded plan (traced on a 3-layer copy and expanded).

Both on the meta device, as the merge streamed from disk traces: no weights are allocated. Prints one table and
checks that the two plans agree (sites aside).

    python benchmarks/bench_expand.py --layers 16 --hidden 256
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

import hf_otfusion  # noqa: F401 - makes transformers importable on CPU-only torch
from hf_otfusion.trace import build_plan, expanded_plan
from hf_otfusion.trace.expand import reproducible_part


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[16])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    print("| layers | hidden | full build_plan (s) | expanded_plan (s) | speed-up | equal |")
    print("|---:|---:|---:|---:|---:|:---:|")
    for layers in args.layers:
        config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                             num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2)
        with torch.device("meta"):
            model = LlamaForCausalLM(config).eval()
        x = {"input_ids": torch.zeros(2, 16, dtype=torch.long, device="meta")}
        start = time.perf_counter()
        full = build_plan(model, x)
        t_full = time.perf_counter() - start
        start = time.perf_counter()
        expanded = expanded_plan(model, x)
        t_expanded = time.perf_counter() - start
        equal = expanded is not None and reproducible_part(expanded) == reproducible_part(full)
        print(f"| {layers} | {args.hidden} | {t_full:.1f} | {t_expanded:.1f} | {t_full / t_expanded:.1f}x | "
              f"{'yes' if equal else 'NO'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
