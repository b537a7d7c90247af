"""The experiments' one command line: ``python -m experiments NAME [options]`` from the repository root.

NAME is one or more of the MNIST suite's experiments (``iid noniid widths compression calibration interpolation``,
or ``all``: they share one context and their parents), or one of the experiments below with its own options
(``python -m experiments NAME --help`` lists them).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from .harness import DESCRIPTIONS

# name on the command line -> (module in this package, what it measures)
STANDALONE = {
    "mnist-mlp": ("mnist_mlp", "the paper's MLPNet on MNIST: OT fusion against vanilla averaging and the ensemble"),
    "mnist-vit": ("mnist_vit", "small vision transformers on MNIST: OT fusion against vanilla averaging"),
    "refit": ("refit", "the closed-form layer refit on the suite's parents (docs/results/refit.md)"),
    "matching": ("matching", "weight matching by coordinate descent (docs/results/matching.md)"),
    "transformers": ("transformer", "a transformers ViT on MNIST and a small Llama on text "
                                    "(docs/results/transformers.md)"),
    "stream": ("stream", "the causal LM's stream: an orthogonal stream map, twice the width (docs/results/stream.md)"),
    "glmc": ("glmc", "data-free orthogonal stream alignment with head and MLP matching (docs/results/glmc.md)"),
    "glmc-learned": ("glmc_learned", "glmc's maps trained on calibration text against the ensemble, weights frozen "
                                     "(docs/results/glmc_learned.md)"),
    "lm-maps": ("lm_maps", "the library's orthogonal stream and head maps on the causal LM (docs/results/lm_maps.md)"),
    "lm-widths": ("lm_widths", "every fusion method on a width-256 Llama and a GPT-2-style LM "
                               "(docs/results/lm_widths.md)"),
}


def usage() -> str:
    """The list of experiments, for ``--help`` and a missing name."""
    lines = [__doc__.strip(), "", "MNIST suite (python -m experiments NAME... [--tiny] [--out DIR] ...):"]
    lines += [f"  {name:<14} {text}" for name, text in DESCRIPTIONS.items()]
    lines += ["", "Experiments with their own options:"]
    lines += [f"  {name:<14} {text}" for name, (_, text) in STANDALONE.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch ``argv`` (default: the command line) to the named experiment."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] in STANDALONE:
        module = importlib.import_module(f"{__package__}.{STANDALONE[argv[0]][0]}")
        module.main(argv[1:])
        return
    if argv[0] not in (*DESCRIPTIONS, "all"):
        sys.exit(f"python -m experiments: no experiment {argv[0]!r}\n\n{usage()}")
    from . import suite

    suite.main(argv)


if __name__ == "__main__":
    main()
