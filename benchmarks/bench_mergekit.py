"""hf-otfusion against mergekit, side by side: the same pair of Llama checkpoints merged by each, in one run.

Rows, each its own process (wall time and peak RSS of that process tree):

- ``mergekit-yaml`` linear merge with ``--lazy-unpickle`` (the baseline);
- ``hf-otfusion merge`` with ``merge_method: linear``;
- ``hf-otfusion merge`` OT fusion, weights mode, first run (an empty plan cache: the plan is traced and verified);
- the same again (the plan read from the cache).

The pairs are randomly initialised ``LlamaForCausalLM`` (seeds 0 and 1) saved in bfloat16 by ``save_pretrained``:
``156m`` (hidden 1,024, 8 layers, MLP 2,816, 16 heads, 4 key/value heads, vocabulary 32,000) and ``1.1b``
(TinyLlama's shape). Read the ratios: on a shared machine the seconds move from run to run.

    python benchmarks/bench_mergekit.py [--sizes 156m 1.1b] [--out docs/bench.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import hf_otfusion  # noqa: F401 - its torchvision hook, before transformers is imported (in make_pair)

SIZES = {
    "156m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
             "num_key_value_heads": 4, "vocab_size": 32000},
    "1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000},
}
# runs a command and prints its wall time and the peak RSS of its process tree (the children's high-water mark)
_MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:]).returncode
wall = time.perf_counter() - start
print("MEASURED", code, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, flush=True)
"""

# mergekit-yaml, with hf-otfusion's torchvision hook first (on a CPU-only torch the CUDA torchvision wheel does not
# import otherwise); the hook only defines two operator schemas, mergekit's merge is untouched
_MERGEKIT = ("import sys, hf_otfusion; from mergekit.scripts.run_yaml import main; "
             "sys.argv[0] = 'mergekit-yaml'; sys.exit(main())")


def make_pair(size: str, folder: Path) -> list[Path]:
    """Two seeded random-init Llama checkpoints of ``size`` in bfloat16 (and a tokenizer-less config)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = []
    for seed in (0, 1):
        path = folder / f"llama-{size}-seed{seed}"
        if not (path / "config.json").is_file():
            torch.manual_seed(seed)
            config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False)
            LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        paths.append(path)
    return paths


def _measure(cmd: Sequence[str], env: dict[str, str]) -> tuple[float, float]:
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("MEASURED")), None)
    if line is None or line.split()[1] != "0":
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    _, _, wall, rss = line.split()
    return float(wall), float(rss)


def run_size(size: str, work: Path) -> list[dict]:
    a, b = make_pair(size, work)
    bin_dir = Path(sys.executable).parent
    models = [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}]
    mergekit = work / f"mergekit-{size}.yml"
    mergekit.write_text(json.dumps({"merge_method": "linear", "models": models, "dtype": "bfloat16"}))
    linear = work / f"linear-{size}.yml"
    linear.write_text(json.dumps({"merge_method": "linear", "models": models, "dtype": "bfloat16"}))
    ot = work / f"ot-{size}.yml"
    ot.write_text(json.dumps({"merge_method": "otfusion", "models": models, "dtype": "bfloat16"}))
    cache = work / "plan-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "HF_OTFUSION_PLAN_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    runs = [
        ("mergekit-yaml linear --lazy-unpickle", [sys.executable, "-c", _MERGEKIT, str(mergekit), "OUT",
                                                 "--lazy-unpickle", "--no-copy-tokenizer"]),
        ("hf-otfusion linear", [str(bin_dir / "hf-otfusion"), "merge", str(linear), "OUT", "-q"]),
        ("hf-otfusion OT weights, first run", [str(bin_dir / "hf-otfusion"), "merge", str(ot), "OUT", "-q"]),
        ("hf-otfusion OT weights, cached plan", [str(bin_dir / "hf-otfusion"), "merge", str(ot), "OUT", "-q"]),
    ]
    rows = []
    for label, cmd in runs:
        out = work / f"out-{size}"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss = _measure([str(out) if c == "OUT" else c for c in cmd], env)
        rows.append({"size": size, "label": label, "wall": wall, "rss": rss})
        print(f"{size} {label}: {wall:.1f} s, {rss:,.0f} MB", flush=True)
    shutil.rmtree(work / f"out-{size}", ignore_errors=True)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    lines = ["| pair | command | wall (s) | peak RSS (MB) | wall / mergekit | RSS / mergekit |",
             "|---|---|---:|---:|---:|---:|"]
    base = {r["size"]: r for r in rows if r["label"].startswith("mergekit")}
    for r in rows:
        ref = base[r["size"]]
        lines.append(f"| {r['size']} | {r['label']} | {r['wall']:.1f} | {r['rss']:,.0f} | "
                     f"{r['wall'] / ref['wall']:.2f}x | {r['rss'] / ref['rss']:.2f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["156m"])
    parser.add_argument("--work", type=Path, default=None, help="folder for the checkpoints (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-mergekit-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d")
    rows = [row for size in args.sizes for row in run_size(size, work)]
    table = format_table(rows)
    print(table)
    if args.out is not None:
        with args.out.open("a", encoding="utf-8") as fh:
            fh.write(f"\n## Against mergekit ({started})\n\nOutput of `python benchmarks/bench_mergekit.py --sizes "
                     f"{' '.join(args.sizes)}` on the 2-core CPU development machine:\n\n{table}\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
