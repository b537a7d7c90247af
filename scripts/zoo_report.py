"""A zoo over the registries: plan, verify, permute and fuse every torchvision classifier, a seeded sample of timm
architectures and every transformers family a generic config shrink builds tiny (``scripts/zoo_models.py``).

Per model, in a child process of its own with a time limit (a timeout or an error is a row, not a crash): build it
(random init, small input), randomise every floating parameter and buffer (``verify``'s randomisation: norm gains
around 1, live BatchNorm statistics), ``build_plan`` (ops without a rule), ``verify_plan`` (the spaces it repaired),
then on a float64 copy: ``random_permutation`` by the verified plan must keep the output (relative max change below
1e-4: a verified plan may be less aligned, never wrong) and ``fuse([m, random_permutation(m)])`` must return
``m``'s function; coverage is the share of floating tensors moved and of hidden channels aligned (the rest fixed,
with the reasons). Results go to a JSON-lines log (``--resume`` skips models already in it); the markdown report
(totals per registry, then one row per model) replaces the zoo section of ``docs/architectures.md`` with ``--doc``.

    python scripts/zoo_report.py --log zoo.jsonl [--registries torchvision,timm,transformers] [--timm-sample 100]
        [--seed 26] [--timeout 60] [--max-params 30e6] [--budget 2700] [--jobs 1] [--doc docs/architectures.md]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import multiprocessing as mp
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import zoo_models  # the sibling script (scripts/ is on the path of a script run from it)

from hf_otfusion import build_plan, fuse, random_permutation
from hf_otfusion.verify import randomise_state, verify_plan

TOLERANCE = 1e-4
REGISTRIES = ("torchvision", "timm", "transformers")
BUILD: dict[str, Callable[[str], zoo_models.Built]] = {
    "torchvision": zoo_models.build_torchvision, "timm": zoo_models.build_timm,
    "transformers": zoo_models.build_transformers}
MAKE: dict[str, Callable[[str], Callable[[], torch.nn.Module]]] = {
    "torchvision": zoo_models.torchvision_make, "timm": zoo_models.timm_make,
    "transformers": zoo_models.transformers_make}
BEGIN, END = "<!-- zoo-report:begin -->", "<!-- zoo-report:end -->"


# ----------------------------------------------------------------------------------------------------------
# One model


def _output(model: torch.nn.Module, x: Any) -> torch.Tensor:
    """The model's main output: its tensor, its ``logits``, else its first entry."""
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def _change(ref: torch.Tensor, out: torch.Tensor) -> float:
    if ref.shape != out.shape:
        return float("inf")
    value = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
    return value if value == value else float("inf")


def _cast(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _short(reason: str, limit: int = 70) -> str:
    reason = re.sub(r" ?\((?:op '[^']*' )?\(?node [^)]*\)\)?", "", reason)
    reason = re.sub(r"\[[\d, ]*\]( -> \d+)?", "…", reason)
    reason = " ".join(reason.split()).replace("|", "/")
    return reason if len(reason) <= limit else reason[: limit - 1].rsplit(" ", 1)[0].rstrip(" ,;:") + "…"


def check(model: torch.nn.Module, x: Any, row: dict[str, Any]) -> dict[str, Any]:
    """Plan, verify, permute and fuse one built model; fills ``row`` as it goes (a failure leaves what was done)."""
    state = model.state_dict()
    row["params"] = zoo_models._count(model)
    randomise_state(model, x, seed=7)
    start = time.perf_counter()
    row["stage"] = "plan"
    plan = build_plan(model, x)
    row["plan_s"] = round(time.perf_counter() - start, 1)
    row["unhandled"] = list(dict.fromkeys(plan.unhandled))
    row["stage"] = "verify"
    plan = verify_plan(model, plan, x)
    v = plan.verification
    row["verified"] = bool(v and v.verified)
    row["repaired"] = list(v.repaired) + [f"heads of {g}" for g in v.heads_fixed] if v else []
    row["verify_note"] = (v.note or "")[:160] if v else ""
    tensors = [k for k in plan.tensors if k not in plan.aliases and state[k].is_floating_point()]
    moving = {m.tensor for s in plan.spaces for m in s.members}
    row["tensors"] = [sum(t in moving for t in tensors), len(tensors)]
    aligned, fixed = sum(s.size for s in plan.spaces), sum(f.size for f in plan.fixed)
    row["channels"] = [aligned, aligned + fixed]
    reasons: dict[str, int] = {}
    for f in plan.fixed:
        why = _short(f.reason) + (" (necessary)" if f.necessary else "")
        reasons[why] = reasons.get(why, 0) + f.size
    row["fixed"] = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
    try:
        _functions(model, plan, x, moving, row, torch.float64)
    except RuntimeError as err:  # an op without float64 kernels (grouped_mm): float32, a looser tolerance
        row["float32"] = f"{type(err).__name__}: {str(err)[:60]}"
        _functions(model, plan, x, moving, row, torch.float32)
    row["stage"] = "done"
    return row


def _functions(model: torch.nn.Module, plan: Any, x: Any, moving: set[str], row: dict[str, Any],
               dtype: torch.dtype) -> None:
    """The permutation and fusion checks on a copy of ``model`` in ``dtype`` (changes scaled to float64's
    tolerance: a float32 change is divided by 10, the ratio of verify's tolerances)."""
    scale = 1.0 if dtype == torch.float64 else 0.1
    row["stage"] = "permute"
    m = copy.deepcopy(model).to(dtype).eval()
    xd = _cast(x, dtype)
    ref = _output(m, xd)
    permuted = random_permutation(m, plan, seed=1)
    row["perm_change"] = scale * _change(ref, _output(permuted, xd))
    after, before = permuted.state_dict(), m.state_dict()
    row["moved"] = sum(not torch.equal(before[t], after[t]) for t in moving if t in before)
    row["stage"] = "fuse"
    fused = fuse([m, permuted], plan=plan, example_input=xd, progress=False)
    row["fuse_change"] = scale * _change(ref, _output(fused, xd))
    spread = ref - ref[:1] if ref.dim() and len(ref) > 1 else ref
    row["vacuous"] = not float(spread.abs().max()) > 1e-6 * float(ref.abs().max())


def survey(registry: str, name: str, max_params: float) -> dict[str, Any]:
    """Build and check one model; every failure becomes the row's ``error``."""
    start = time.perf_counter()
    row: dict[str, Any] = {"registry": registry, "name": name, "stage": "build"}
    try:
        torch.manual_seed(0)
        counted = zoo_models.params(MAKE[registry](name))
        if counted is not None and counted > max_params:
            row.update(stage="skipped", error=f"{counted / 1e6:.1f} M parameters, over the budget")
            row["seconds"] = round(time.perf_counter() - start, 1)
            return row
        model, x, note = BUILD[registry](name)
        row["note"] = note
        n = zoo_models._count(model)
        if n > max_params:
            row.update(stage="skipped", error=f"{n / 1e6:.1f} M parameters, over the budget")
        else:
            check(model, x, row)
    except Exception as err:  # noqa: BLE001 - the report shows every failure
        row["error"] = _short(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", 160)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _child(registry: str, name: str, max_params: float, conn: Any) -> None:
    torch.set_num_threads(1)
    conn.send(survey(registry, name, max_params))
    conn.close()


# ----------------------------------------------------------------------------------------------------------
# The run


WALL = 5  # a model's wall-time limit, in multiples of its CPU-time limit (the machine may be shared)


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc (0 where that cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run(tasks: Sequence[tuple[str, str]], log: Path, *, timeout: float, max_params: float, budget: float,
        jobs: int = 1, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Survey ``tasks`` ((registry, name)) in child processes, ``jobs`` at a time, each within ``timeout`` seconds,
    appending each row to ``log``. ``timeout`` counts the child's CPU time (a shared machine's load does not
    turn slow models into timeouts; :data:`WALL` times it bounds the wall time). No new model starts after
    ``budget`` seconds (the rest: not run)."""
    ctx = mp.get_context("fork")
    rows: list[dict[str, Any]] = []
    pending = list(tasks)
    running: list[tuple[Any, Any, tuple[str, str], float]] = []
    start = time.monotonic()

    def finish(row: dict[str, Any]) -> None:
        rows.append(row)
        with log.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        echo(f"[{time.monotonic() - start:6.0f} s] {row['registry']}/{row['name']}: {verdict(row)}")

    while pending or running:
        while pending and len(running) < jobs and time.monotonic() - start < budget:
            registry, name = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(registry, name, max_params, child), daemon=True)
            proc.start()
            child.close()
            running.append((proc, parent, (registry, name), time.monotonic()))
        if not running:
            break
        time.sleep(0.2)
        for item in list(running):
            proc, conn, (registry, name), began = item
            row = None
            if conn.poll():
                try:
                    row = conn.recv()
                except EOFError:
                    row = {"registry": registry, "name": name, "stage": "crash", "error": "the child process died"}
            elif not proc.is_alive():
                row = {"registry": registry, "name": name, "stage": "crash",
                       "error": f"the child process died (exit code {proc.exitcode})"}
            elif _cpu_seconds(proc.pid) > timeout or time.monotonic() - began > WALL * timeout:
                proc.kill()
                row = {"registry": registry, "name": name, "stage": "timeout",
                       "error": f"over {timeout:.0f} s of CPU (or {WALL * timeout:.0f} s of wall time)"}
            if row is not None:
                proc.join()
                row.setdefault("seconds", round(time.monotonic() - began, 1))
                running.remove(item)
                finish(row)
    for registry, name in pending:
        finish({"registry": registry, "name": name, "stage": "not run", "error": "the run's time budget was spent"})
    return rows


def verdict(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"{row['stage']}: {row['error']}"
    bad = [k for k in ("perm_change", "fuse_change") if not row[k] < TOLERANCE]
    fail = f"FAIL {','.join(bad)} " if bad else ""
    return (f"{fail}unhandled={row['unhandled']} repaired={len(row['repaired'])}"
            f" perm={row['perm_change']:.1e} fuse={row['fuse_change']:.1e}")


# ----------------------------------------------------------------------------------------------------------
# The report


def totals(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    rows = list(rows)
    done = [r for r in rows if r.get("stage") == "done"]
    planned = [r for r in rows if "unhandled" in r]
    return {
        "models": len(rows),
        "over budget": sum(r.get("stage") == "skipped" for r in rows),
        "not run": sum(r.get("stage") == "not run" for r in rows),
        "timeouts": sum(r.get("stage") == "timeout" for r in rows),
        "build failed": sum(r.get("stage") == "build" and bool(r.get("error")) for r in rows),
        "built": sum(r.get("stage") not in ("build", "skipped", "not run", "timeout", "crash") for r in rows),
        "planned": len(planned),
        "nothing unhandled": sum(not r["unhandled"] for r in planned),
        "verified": sum(bool(r.get("verified")) for r in planned),
        "with repairs": sum(bool(r.get("repaired")) for r in planned),
        "checked": len(done),
        "permutation failures": sum(not r["perm_change"] < TOLERANCE for r in done),
        "fuse failures": sum(not r["fuse_change"] < TOLERANCE for r in done),
        "errors after build": sum(r.get("stage") in ("plan", "verify", "permute", "fuse", "crash") for r in rows),
    }


def _cell(row: dict[str, Any]) -> list[str]:
    name = f"`{row['name']}`"
    if row.get("error"):
        return [name, row.get("note", ""), "-", "-", "-", "-", "-", "-", f"{row['stage']}: {row['error']}"]
    params = f"{row['params'] / 1e6:.2f} M"
    unhandled = ", ".join(f"`{op}`" for op in row["unhandled"]) or "none"
    repaired = row["repaired"]
    ver = ("yes" if row["verified"] else "**no**") + (f"; repaired {len(repaired)}: " + ", ".join(
        f"`{r}`" for r in repaired[:3]) + (" …" if len(repaired) > 3 else "") if repaired else "")
    perm = f"{'**FAIL** ' if not row['perm_change'] < TOLERANCE else ''}{row['perm_change']:.0e}"
    fused = f"{'**FAIL** ' if not row['fuse_change'] < TOLERANCE else ''}{row['fuse_change']:.0e}"
    tensors = f"{row['tensors'][0]}/{row['tensors'][1]}"
    a, total = row["channels"]
    channels = f"{100 * a / total:.0f}%" if total else "-"
    fixed = "; ".join(f"{n}: {why}" for why, n in row["fixed"]) or "none"
    if row.get("vacuous"):
        perm += " (output ignores input)"
    return [name, f"{row.get('note', '')}, {params}", unhandled, ver, perm, fused, tensors, channels, fixed]


def render(rows: Sequence[dict[str, Any]], command: str, seconds: float, seed: int) -> str:
    lines = [BEGIN, "", "## The registry zoo", "",
             f"Produced by `{command}` ({seconds / 60:.0f} min wall on a shared 2-core CPU, one torch thread per "
             f"model; timm sample seed {seed}). Every model random-init, every floating parameter and buffer "
             "randomised (`verify`'s randomisation), then `build_plan`, `verify_plan` (its repairs named), and on a "
             "float64 copy `random_permutation` by the verified plan (relative max change of the output; above "
             f"{TOLERANCE:g} it is a **FAIL**) and `fuse([m, random_permutation(m)])` against `m`. *Tensors*: "
             "floating state tensors moved by the plan / all; *channels*: hidden channels aligned / aligned + fixed; "
             "*fixed*: the largest fixed groups (channels: reason).", "",
             "| registry | " + " | ".join(totals([]).keys()) + " |", "|---|" + "---:|" * len(totals([]))]
    for registry in REGISTRIES:
        mine = [r for r in rows if r["registry"] == registry]
        if mine:
            lines.append(f"| {registry} | " + " | ".join(str(v) for v in totals(mine).values()) + " |")
    lines.append("| **all** | " + " | ".join(f"**{v}**" for v in totals(rows).values()) + " |")
    header = ("| model | input, params | ops without a rule | verified (repairs) | permutation | fuse | tensors "
              "| channels | fixed |")
    for registry in REGISTRIES:
        mine = [r for r in rows if r["registry"] == registry]
        if not mine:
            continue
        lines += ["", f"### {registry} ({len(mine)})", "", header, "|---|---|---|---|---:|---:|---:|---:|---|"]
        lines += ["| " + " | ".join(_cell(r)) + " |" for r in sorted(mine, key=lambda r: r["name"])]
    return "\n".join([*lines, "", END])


def write_doc(doc: Path, text: str) -> None:
    """Replace the zoo section of ``doc`` (between the markers) with ``text``, or append it."""
    old = doc.read_text(encoding="utf-8") if doc.exists() else ""
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    doc.write_text(new, encoding="utf-8")


def tasks_for(registries: Sequence[str], sample: int, seed: int, max_params: float,
              echo: Callable[[str], None] = print) -> list[tuple[str, str]]:
    """Every registry's models, taken in turn (one of each, then the next of each): a run cut short by its budget
    leaves a share of every registry. transformers' families go in a shuffled order (``seed``), so such a share is
    not just the first letters of the alphabet."""
    lists: list[list[tuple[str, str]]] = []
    for registry in registries:
        if registry == "torchvision":
            lists.append([("torchvision", n) for n in zoo_models.torchvision_names()])
        elif registry == "timm":
            picked, over = zoo_models.timm_sample(sample, seed, max_params,
                                                  lambda n: zoo_models.params(zoo_models.timm_make(n)))
            echo(f"timm sample (seed {seed}): {len(picked)} within {max_params / 1e6:.0f} M parameters; "
                 f"{len(over)} passed over: {', '.join(over)}")
            lists.append([("timm", n) for n in picked])
        elif registry == "transformers":
            kinds = list(zoo_models.transformers_families())
            random.Random(seed).shuffle(kinds)
            lists.append([("transformers", k) for k in kinds])
    return [t for turn in itertools.zip_longest(*lists) for t in turn if t is not None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registries", default=",".join(REGISTRIES))
    parser.add_argument("--names", help="comma-separated registry/name pairs (instead of the registries' lists)")
    parser.add_argument("--timm-sample", type=int, default=100)
    parser.add_argument("--seed", type=int, default=26, help="the timm sample's seed")
    parser.add_argument("--timeout", type=float, default=60.0, help="CPU seconds per model")
    parser.add_argument("--max-params", type=float, default=30e6, help="skip models over this many parameters")
    parser.add_argument("--budget", type=float, default=2700.0, help="seconds for the whole run")
    parser.add_argument("--jobs", type=int, default=1, help="models checked at once (one torch thread each)")
    parser.add_argument("--log", type=Path, required=True, help="JSON-lines results (appended)")
    parser.add_argument("--resume", action="store_true", help="skip models already in the log")
    parser.add_argument("--render-only", action="store_true", help="only render the log")
    parser.add_argument("--doc", type=Path, help="write the report into this markdown file's zoo section")
    parser.add_argument("--minutes", type=float, help="the run's wall time to state in the report")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    def echo(line: str) -> None:
        print(line, flush=True)

    start = time.monotonic()
    if not args.render_only:
        if args.names:
            tasks = [tuple(n.strip().split("/", 1)) for n in args.names.split(",") if n.strip()]
        else:
            tasks = tasks_for(args.registries.split(","), args.timm_sample, args.seed, args.max_params, echo)
        if args.resume and args.log.exists():
            seen = {(r["registry"], r["name"]) for r in map(json.loads, args.log.read_text().splitlines())
                    if r.get("stage") not in ("not run", "timeout")}
            tasks = [t for t in tasks if t not in seen]
        run(tasks, args.log, timeout=args.timeout, max_params=args.max_params,
            budget=args.budget - (time.monotonic() - start), jobs=args.jobs, echo=echo)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in map(json.loads, args.log.read_text().splitlines()):
        if r.get("stage") != "not run" or (r["registry"], r["name"]) not in rows:
            rows[(r["registry"], r["name"])] = r
    seconds = args.minutes * 60 if args.minutes else time.monotonic() - start
    command = "python scripts/zoo_report.py " + " ".join(a for a in (argv or sys.argv[1:]) if a != "--render-only")
    text = render(list(rows.values()), command, seconds, args.seed)
    for registry in REGISTRIES:
        mine = [r for r in rows.values() if r["registry"] == registry]
        if mine:
            echo(f"{registry}: {totals(mine)}")
    if args.doc is not None:
        write_doc(args.doc, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
