"""The library's maps beyond permutations on the causal LMs (issue 28): ``residual="orthogonal"`` (the residual
stream by any orthogonal map, norm gains folded) and ``head_maps="orthogonal"`` (an orthogonal map inside each
value head, a rotation per rotary pair inside each query/key head), alone and together, with and without the
closed-form refit, against the permutation-only fusions, on the LM of ``python -m experiments transformers`` (or a
wider one with ``--lm-model``, where experiments.transformer offers it).

Writes docs/results/lm_maps.md (or lm_maps-<model>.md):

    python -m experiments lm-maps --cache /tmp/tx/cache --threads 1
    python -m experiments lm-maps --tiny --seeds 1 --out /tmp/m   # a smoke run

Every run also writes its per-seed values to lm_maps[-<model>].json beside the table (after every row, so an
interrupted run keeps what it measured). ``--seed-from K`` starts at the K-th seed (parents 100 K and 100 K + 1), and
``--merge FILE`` adds the per-seed values of an earlier run's JSON to this run's table: a third seed can be run alone
and reported with the first two.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_otfusion import ensemble, fuse, vanilla_average

from . import transformer as tx
from .harness import ROOT, context

SWEEPS = 15
LEARN_STEPS = 500
STREAM = {"target": "stream"}
ROWS: dict[str, dict[str, Any]] = {
    "OT (weights) + refit": dict(repair="refit"),
    f"weight matching ({SWEEPS} sweeps)": dict(sweeps=SWEEPS),
    f"weight matching ({SWEEPS} sweeps) + refit": dict(sweeps=SWEEPS, repair="refit"),
    "residual orthogonal": dict(residual="orthogonal", sweeps=SWEEPS),
    "residual orthogonal + refit": dict(residual="orthogonal", sweeps=SWEEPS, repair="refit"),
    "head maps": dict(head_maps="orthogonal", sweeps=SWEEPS),
    "head maps + refit": dict(head_maps="orthogonal", sweeps=SWEEPS, repair="refit"),
    "residual orthogonal, head maps": dict(residual="orthogonal", head_maps="orthogonal", sweeps=SWEEPS),
    "residual orthogonal, head maps + refit": dict(residual="orthogonal", head_maps="orthogonal", sweeps=SWEEPS,
                                                   repair="refit"),
    "residual orthogonal, head maps + refit (stream target)": dict(
        residual="orthogonal", head_maps="orthogonal", sweeps=SWEEPS, repair="refit", repair_parameters=STREAM),
    f"weight matching ({SWEEPS} sweeps), signed units": dict(sweeps=SWEEPS, hidden_maps="signed"),
    f"weight matching ({SWEEPS} sweeps), signed units + refit": dict(sweeps=SWEEPS, hidden_maps="signed",
                                                                      repair="refit"),
    "residual orthogonal, head maps, signed units + refit (stream target)": dict(
        residual="orthogonal", head_maps="orthogonal", hidden_maps="signed", sweeps=SWEEPS, repair="refit",
        repair_parameters=STREAM),
    f"activations + weight matching ({SWEEPS} sweeps) + refit": dict(alignment="activations", sweeps=SWEEPS,
                                                                      repair="refit"),
    "activations, residual orthogonal, head maps": dict(alignment="activations", residual="orthogonal",
                                                        head_maps="orthogonal", sweeps=SWEEPS),
    "activations, residual orthogonal, head maps + refit (stream target)": dict(
        alignment="activations", residual="orthogonal", head_maps="orthogonal", sweeps=SWEEPS, repair="refit",
        repair_parameters=STREAM),
    f"learned ({LEARN_STEPS} steps), residual orthogonal, head maps": dict(
        alignment="learned", residual="orthogonal", head_maps="orthogonal", sweeps=SWEEPS, learn_steps=LEARN_STEPS),
    f"learned ({LEARN_STEPS} steps) from activations, residual orthogonal, head maps": dict(
        alignment="learned", learn_from="activations", residual="orthogonal", head_maps="orthogonal", sweeps=SWEEPS,
        learn_steps=LEARN_STEPS),
    f"learned ({LEARN_STEPS} steps), residual orthogonal, head maps + refit (stream target)": dict(
        alignment="learned", residual="orthogonal", head_maps="orthogonal", sweeps=SWEEPS, learn_steps=LEARN_STEPS,
        repair="refit", repair_parameters=STREAM),
    f"learned ({LEARN_STEPS} steps), residual orthogonal, head maps, signed units": dict(
        alignment="learned", residual="orthogonal", head_maps="orthogonal", hidden_maps="signed", sweeps=SWEEPS,
        learn_steps=LEARN_STEPS),
}
FLOORS = {"llama64": 0.80, "llama256": 0.85}


def main(argv: Sequence[str]) -> None:
    """Run it with the options in ``argv`` (those of ``transformers``, plus ``--out``); writes lm_maps.md."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    own.add_argument("--rows", nargs="+", metavar="TEXT", help="only the fused rows whose names contain one of these")
    own.add_argument("--skip", nargs="+", default=[], metavar="TEXT", help="leave out the rows whose names contain one")
    own.add_argument("--learn-steps", type=int, default=LEARN_STEPS, help="steps of the learned rows")
    own.add_argument("--seed-from", type=int, default=0, help="the first seed (parents 100 K and 100 K + 1)")
    own.add_argument("--merge", type=Path, nargs="+", default=[], metavar="JSON",
                     help="earlier runs' per-seed values (their lm_maps*.json) to report with this run's")
    args = tx.lm_options(own, argv)
    rows_run = {name.replace(str(LEARN_STEPS), str(args.learn_steps)): {**kw, **({"learn_steps": args.learn_steps}
                                                                             if "learn_steps" in kw else {})}
                for name, kw in ROWS.items() if (not args.rows or any(t in name for t in args.rows))
                and not any(t in name for t in args.skip)}
    ctx = context(args)
    s, tag = tx.lm_of(args)
    model_name = getattr(args, "lm_model", "llama64")
    started = time.perf_counter()
    rows: dict[str, dict[str, list[float]]] = {}
    seeds_run: list[int] = []
    for earlier in args.merge:
        record = json.loads(earlier.read_text(encoding="utf-8"))
        if record["model"] != model_name:
            raise SystemExit(f"--merge {earlier}: its model is {record['model']}, this run's is {model_name}")
        seeds_run += record["seeds"]
        for name, values in record["rows"].items():
            for key, v in values.items():
                rows.setdefault(name, {"loss": [], "gap": [], "barrier": [], "seconds": []})[key] += v
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "lm_maps" if model_name == "llama64" else f"lm_maps-{model_name}"
    own_rows: dict[str, dict[str, list[float]]] = {}

    def add(name: str, loss: float, seconds: float, vanilla: float, ens: float, parents: float) -> None:
        for table in (rows, own_rows):
            r = table.setdefault(name, {"loss": [], "gap": [], "barrier": [], "seconds": []})
            r["loss"].append(loss)
            r["gap"].append((vanilla - loss) / (vanilla - ens))
            r["barrier"].append(loss - parents)
            r["seconds"].append(seconds)
        raw = {"model": model_name, "argv": list(argv), "seeds": own_seeds, "rows": own_rows}
        (args.out / f"{stem}.json").write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")

    own_seeds: list[int] = []
    for seed in range(args.seed_from, args.seed_from + args.seeds):
        own_seeds.append(seed)
        a, b = (tx.parent(ctx, s, 100 * seed + i, tag) for i in range(2))
        parents = (s.score(a) + s.score(b)) / 2
        vanilla, ens = s.score(vanilla_average([a, b])), s.score(ensemble([a, b]))
        for name, value in (("parents (mean)", parents), ("vanilla average", vanilla), ("ensemble", ens)):
            add(name, value, 0.0, vanilla, ens, parents)
        for name, kw in rows_run.items():
            t0 = time.perf_counter()
            fused = fuse([a, b], calibration=s.calib, example_input=s.example, progress=False, **kw)
            seconds = time.perf_counter() - t0
            add(name, s.score(fused), seconds, vanilla, ens, parents)
            print(f"[seed {seed}, {name}: {rows[name]['loss'][-1]:.3f} nats, {100 * rows[name]['gap'][-1]:.1f}% "
                  f"of the gap, {seconds:.1f} s]", file=sys.stderr, flush=True)

    def cell(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * std:.{digits}f}"

    table = ["| model | test loss (nats/token) | perplexity | loss gap closed (%) | barrier (nats) | fusion time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    table += [f"| {name} | {cell(r['loss'])} | {math.exp(statistics.fmean(r['loss'])):.2f} | "
              f"{cell(r['gap'], 100, 1)} | {cell(r['barrier'])} | {cell(r['seconds'], 1, 1)} |"
              for name, r in rows.items()]
    fused_rows = [n for n in rows if n not in ("parents (mean)", "vanilla average", "ensemble")]
    best = max(fused_rows, key=lambda n: statistics.fmean(rows[n]["gap"]))
    gap = statistics.fmean(rows[best]["gap"])
    floor = None if args.tiny else FLOORS.get(model_name)  # a smoke run states no verdict
    verdict = "" if floor is None else (
        f" Floor for this model (>= {floor:.0%} of the loss gap, no gradient step on any weight): "
        + ("met." if gap >= floor else f"**not met**, {100 * (floor - gap):.1f} points short."))
    command = shlex.join(argv)
    merged = (f"; {', '.join(map(str, seeds_run))} from {', '.join(f'`{m}`' for m in args.merge)}"
              if args.merge else "")
    lines = [
        "# Maps beyond permutations: the residual stream and the inside of attention heads",
        "",
        f"Produced by `python -m experiments lm-maps{' ' + command if command else ''}` in "
        f"{time.perf_counter() - started:.0f} s ({torch.get_num_threads()} CPU thread(s), torch {torch.__version__}, "
        f"on a 2-core machine shared with other jobs: read the times as rough); mean ± std over "
        f"{len(seeds_run + own_seeds)} seed(s) (seed indices {', '.join(map(str, seeds_run + own_seeds))}{merged}"
        "), the parents of `python -m experiments transformers` (same seeds and cache).",
        "",
        s.describe,
        "",
        "Every row is one call of `hf_otfusion.fuse([a, b], ...)` with the options named (weights alignment, exact "
        f"solver; `weight matching`: `sweeps={SWEEPS}`). `residual orthogonal`: `residual=\"orthogonal\"`, the "
        "RMSNorm gains folded into the layers reading them and the stream solved by orthogonal Procrustes inside "
        "weight matching. `head maps`: `head_maps=\"orthogonal\"`, inside each key/value head an orthogonal map of "
        "the values (and the output projection's columns), inside each query/key head a rotation per rotary channel "
        "pair, fitted before every sweep and on the final alignment. `+ refit`: `repair=\"refit\"` (the closed-form "
        "refit on 300 calibration sequences; `stream target`: `repair_parameters={\"target\": \"stream\"}`). "
        "`signed units`: `hidden_maps=\"signed\"`, each MLP unit matched up to the sign of its up row and down column "
        "inside weight matching. `activations`: `alignment=\"activations\"` (the single pass on the calibration "
        "sequences' activations), and weight matching then scores each space without heads (MLP units, the stream) "
        "by its weights' similarity plus its activations' (`E[a_i b_j]`, scaled to the same Frobenius norm). "
        f"`learned`: `alignment=\"learned\"` (`from activations`: `learn_from=\"activations\"`, started from the "
        f"`activations` alignment above), `learn_steps={args.learn_steps}` (Adam, lr 0.01, "
        "the default): the same maps (the value heads' maps any invertible map, not only orthogonal), plus a scale per "
        "MLP unit (up row times it, down column divided), then trained on the calibration sequences against the "
        "parents' ensemble (KL of the next-token distributions), every model weight frozen: gradients reach only the "
        "maps. No labels, and no gradient step on any weight. Loss gap closed = (vanilla loss - loss) / (vanilla "
        "loss - ensemble loss), per seed; barrier = loss - the parents' mean loss; perplexity = exp(mean loss).",
        "",
        *table,
        "",
        f"Best: **{best}**, {cell(rows[best]['loss'])} nats, {100 * gap:.1f}% of the loss gap, barrier "
        f"{cell(rows[best]['barrier'])} nats.{verdict}",
    ]
    (args.out / f"{stem}.md").write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    print("\n".join(lines))
