"""The MNIST suite: i.i.d. and non-i.i.d. fusion, widths, compression, calibration size and the interpolation path,
with norm reset, REPAIR and a short fine-tune, on one shared context (several experiments of one run share their
parents). Writes a markdown report and PNG figures per experiment, and an index, into ``--out``.

    python -m experiments all              # every experiment, writes docs/results/
    python -m experiments iid noniid       # some of them
    python -m experiments iid --tiny --out /tmp/results   # a smoke run in seconds
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import calibration, compression, iid, interpolation, noniid, widths
from .harness import Ctx, context, parse_args, write_index

RUNNERS: dict[str, Callable[[Ctx], Path]] = {
    "iid": iid.run, "noniid": noniid.run, "widths": widths.run, "compression": compression.run,
    "calibration": calibration.run, "interpolation": interpolation.run}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the experiments named in ``argv`` (or ``all``) with the suite's options."""
    args = parse_args(argv)
    ctx = context(args)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for name in args.experiments:
        t0 = time.perf_counter()
        RUNNERS[name](ctx)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    write_index(args.out)
    print(f"[all: {time.perf_counter() - started:.0f} s, of which training {ctx.train_seconds:.0f} s]", file=sys.stderr)
