"""Exact assignment at LLM widths: SciPy against the Jonker-Volgenant solvers on PyPI, and Sinkhorn (issue 14).

    OMP_NUM_THREADS=1 python benchmarks/bench_assignment.py > table.md

Costs are those fusions produce, float32 Euclidean distances between the rows of weight matrices (``d`` columns):

- ``independent``: two independently initialised matrices (models with nothing in common: the hardest case, and
  what the fusion of separately trained models is closest to);
- ``related``: a matrix against a row-permuted copy plus noise of the same scale (models that share a history);
- ``uniform``: uniform random costs, the textbook benchmark, for reference.

On a machine with CUDA and ``torch-linear-assignment`` installed (``pip install torch-linear-assignment``: SciPy's
exact algorithm as a Triton kernel, the cost never leaving the GPU), it gets a column too.

Each solver's time is one run; a run whose time, extrapolated from the solver's previous size (n^3 for the exact
solvers, n^2 for Sinkhorn), would pass ``--cap`` seconds (``--cap-integrated`` for the integrated solver) is
skipped and shown as ``skip (~N s)``. The other JV variants run up to ``--compare-upto``; beyond that only SciPy
(within the cap) and the solver that ``hf_otfusion.transport.assignment`` uses. Every optimum is checked against
SciPy's (or, where SciPy was skipped, against the integrated solver's), relative tolerance 1e-9. Sinkhorn is the
project's ``solve(..., solver="sinkhorn")``; its iteration count is read from POT's log, and ``cost/opt`` is its
coupling's transport cost over the exact optimum (1.000 = as good as exact).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import time
from collections.abc import Callable

import numpy as np
import torch

from hf_otfusion.transport import marginal, pairwise_distance, solve

Assign = Callable[[np.ndarray], np.ndarray]  # cost -> column of each row


def exact_solvers() -> dict[str, Assign]:
    """Every exact solver importable here, keyed by its label (the integrated one is ``lapx.lapjvs f64``)."""
    from scipy.optimize import linear_sum_assignment

    out: dict[str, Assign] = {f"SciPy {importlib.metadata.version('scipy')}": lambda c: linear_sum_assignment(c)[1]}
    try:
        import lap

        dist = "lapx" if hasattr(lap, "lapjvs") else "lap"
        ver = importlib.metadata.version(dist)
        out[f"{dist} {ver} lapjv"] = lambda c: lap.lapjv(c, return_cost=False)[0]
        if dist == "lapx":
            out["lapx.lapjvs f64"] = lambda c: lap.lapjvs(c, return_cost=False, jvx_like=False,
                                                           prefer_float32=False)[0]
            out["lapx.lapjvs f32"] = lambda c: lap.lapjvs(c, return_cost=False, jvx_like=False)[0]
    except ImportError:
        pass
    try:
        import lapjv

        ver = importlib.metadata.version("lapjv")
        out[f"lapjv {ver} (f32)"] = lambda c: lapjv.lapjv(c.astype(np.float32))[0]
    except ImportError:
        pass
    if torch.cuda.is_available():  # an exact solver on the GPU (Triton), where it is installed: the cost stays there
        try:
            from torch_linear_assignment import batch_linear_assignment

            ver = importlib.metadata.version("torch-linear-assignment")

            def on_gpu(c: np.ndarray) -> np.ndarray:
                cost = torch.from_numpy(c).cuda()  # a fusion's cost is already there; the copy is timed too
                cols = batch_linear_assignment(cost[None])[0]
                return cols.cpu().numpy()

            out[f"torch-linear-assignment {ver} (CUDA)"] = on_gpu
        except ImportError:
            pass
    return out


INTEGRATED = "lapx.lapjvs f64"


def make_cost(kind: str, n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.rand(n, n, generator=gen)
    w = torch.randn(n, d, generator=gen)
    if kind == "independent":
        other = torch.randn(n, d, generator=gen)
    elif kind == "related":
        other = w[torch.randperm(n, generator=gen)] + torch.randn(n, d, generator=gen)
    else:
        raise SystemExit(f"unknown cost kind {kind!r}")
    return pairwise_distance(w, other)


class Sinkhorn:
    """The project's Sinkhorn, with POT's iteration count captured (``solve`` calls ``ot.sinkhorn``)."""

    def __init__(self) -> None:
        import ot

        self.ot, self.real, self.niter = ot, ot.sinkhorn, None

        def logged(*args, **kwargs):
            t, log = self.real(*args, **{**kwargs, "log": True})
            self.niter = int(log["niter"]) + 1  # POT logs the index of the last iteration
            return t

        ot.sinkhorn = logged

    def __call__(self, cost: torch.Tensor, reg: float) -> tuple[int, float, torch.Tensor]:
        n = cost.shape[0]
        t0 = time.perf_counter()
        t = solve(cost, marginal(n), marginal(n), solver="sinkhorn", reg=reg)
        return self.niter, time.perf_counter() - t0, t


def fmt_s(s: float) -> str:
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="768,3072,5632,11008,14336")
    p.add_argument("--kinds", default="independent,related,uniform")
    p.add_argument("--d", type=int, default=512, help="columns of the weight matrices whose rows are compared")
    p.add_argument("--cap", type=float, default=60.0, help="skip a run predicted to pass this many seconds")
    p.add_argument("--cap-integrated", type=float, default=180.0, help="the same, for the integrated solver")
    p.add_argument("--compare-upto", type=int, default=5632, help="largest n at which every JV variant runs")
    p.add_argument("--sharp-reg", type=float, default=0.005, help="second Sinkhorn column's reg (log domain)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    solvers = exact_solvers()
    scipy_name = next(iter(solvers))
    sinkhorn = Sinkhorn()
    regs = (0.05, args.sharp_reg)
    last: dict[tuple[str, str], tuple[int, float]] = {}  # (kind, solver) -> (n, seconds) of its last run

    def predicted(kind: str, name: str, n: int, power: float) -> float:
        if (kind, name) not in last:
            return 0.0
        n0, s0 = last[kind, name]
        return s0 * (n / n0) ** power

    head = ["n", "cost"] + [f"{s} s" for s in solvers] + ["speed-up vs SciPy", "same optimum"]
    head += [f"Sinkhorn reg {r}: iters / s / cost/opt" for r in regs]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    t_start = time.perf_counter()
    for n in sizes:
        for kind in kinds:
            gen = torch.Generator().manual_seed(args.seed * 1000 + n)
            cost = make_cost(kind, n, args.d, gen)
            c = cost.double().numpy()
            c_t = torch.from_numpy(c)
            cells, opt, times = [], {}, {}
            for name, fn in solvers.items():
                if n > args.compare_upto and name not in (scipy_name, INTEGRATED):
                    cells.append("-")
                    continue
                guess = predicted(kind, name, n, 3)
                if guess > (args.cap_integrated if name == INTEGRATED else args.cap):
                    cells.append(f"skip (~{guess:.0f})")
                    continue
                t0 = time.perf_counter()
                cols = np.asarray(fn(c))
                times[name] = time.perf_counter() - t0
                last[kind, name] = (n, times[name])
                if not np.array_equal(np.sort(cols), np.arange(n)):
                    raise SystemExit(f"{name} did not return a permutation at n={n} ({kind})")
                opt[name] = float(c[np.arange(n), cols].sum())
                cells.append(fmt_s(times[name]))
            if not opt:
                print("| " + " | ".join([f"{n:,}", kind, *cells, "-", "-", "-", "-"]) + " |", flush=True)
                continue
            ref_name = scipy_name if scipy_name in opt else INTEGRATED if INTEGRATED in opt else next(iter(opt))
            ref = opt[ref_name]
            worst = max(abs(v - ref) / abs(ref) for v in opt.values())
            same = ("yes" if worst <= 1e-9 else f"NO ({worst:.1e})") + ("" if ref_name == scipy_name else
                                                                      f" (vs {ref_name})")
            if scipy_name in times:
                fast = min((s, k) for k, s in times.items() if k != scipy_name)
                speed = f"{times[scipy_name] / fast[0]:.1f}x ({fast[1]})"
            else:
                speed = "SciPy skipped"
            sk_cells = []
            for reg in regs:
                key = f"sinkhorn {reg}"
                guess = predicted(kind, key, n, 2)
                if guess > args.cap:
                    sk_cells.append(f"skip (~{guess:.0f} s)")
                    continue
                try:
                    iters, secs, t = sinkhorn(cost, reg)
                except Exception as e:  # not converged: say so, with the time it took
                    sk_cells.append(f"failed ({type(e).__name__})")
                    continue
                last[kind, key] = (n, secs)
                ratio = float(t.reshape(-1) @ c_t.reshape(-1)) * n / ref  # no n x n temporary
                sk_cells.append(f"{iters} / {fmt_s(secs)} / {ratio:.3f}")
                del t
            print("| " + " | ".join([f"{n:,}", kind, *cells, speed, same, *sk_cells]) + " |", flush=True)
            del cost, c, c_t
    print(f"\n(total {time.perf_counter() - t_start:.0f} s; torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
