"""What verifying a plan costs (hf_otfusion.verify), against the fusion it guards, on a Llama-shaped decoder.

The plan is traced as a streamed merge traces it (the empty model on the ``meta`` device, a shallow copy expanded by
layer index), then verified with a real example batch: the meta parameters get memory and random values. The fusion
is a weights-mode ``fuse`` of two random-init models of the shape, in memory, with the verified plan.

    python benchmarks/bench_verify.py [--layers 24 --hidden 1024 --mlp 2816 --heads 16 --kv-heads 4] [--no-fuse]
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_otfusion import fuse
from hf_otfusion.plan_cache import cached_plan
from hf_otfusion.profile import profiling


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=16, help="example tokens per sequence (batch of 2)")
    parser.add_argument("--no-fuse", action="store_true", help="skip the fusion it is compared with")
    args = parser.parse_args()
    import transformers

    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads, use_cache=False)
    with torch.device("meta"):
        empty = transformers.LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in empty.parameters())
    x = {"input_ids": torch.randint(0, args.vocab, (2, args.tokens), generator=torch.Generator().manual_seed(0))}
    meta_x = {k: v.to("meta") for k, v in x.items()}
    with profiling() as prof:
        start = time.perf_counter()
        plan = cached_plan(empty, meta_x, enabled=False, sites=False, verify_input=x)
        total = time.perf_counter() - start
    v = plan.verification
    print(f"Llama {params / 1e6:.0f} M parameters ({args.layers} layers, hidden {args.hidden}, MLP {args.mlp}), "
          f"{len(plan.spaces)} spaces, expanded plan: {plan.expanded}")
    print(f"plan: {total:.1f} s (trace {total - prof.seconds.get('verify', 0.0):.1f} s, verify "
          f"{prof.seconds.get('verify', 0.0):.1f} s); {v}")
    if args.no_fuse:
        return 0
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(transformers.LlamaForCausalLM(config).eval())
    start = time.perf_counter()
    fuse(models, plan=plan, example_input=x, progress=False)
    print(f"fuse (weights mode, in memory, the verified plan): {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
