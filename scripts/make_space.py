"""Write a ready-to-push Hugging Face Space folder that runs the hf-otfusion gradio demo.

The folder holds:

- ``app.py``: builds the demo in Space mode (user input may name Hub ids and the bundled examples, never local
  files) and launches it when run as ``python app.py`` (what a gradio Space does); importing it only builds it.
- ``hf_otfusion/``: a copy of this package. The Space imports it from its own folder, so it needs no release on
  PyPI, no git URL and no network to install, and it runs exactly the code it was made from.
- ``requirements.txt``: the package's runtime dependencies and the demo's (gradio itself comes from the Space's
  ``sdk_version``).
- ``README.md``: the Space card, with front matter (title, emoji, colors, sdk, sdk_version, app_file, models,
  short_description, license).
- ``examples/models``, ``examples/data``: the bundled example models and data, so the Space works offline.

Push it with ``hf upload YOUR-NAME/otfusion-demo OUT_DIR . --repo-type space``.

    python scripts/make_space.py OUT_DIR [--title ...] [--model ORG/NAME ...] [--sdk-version X.Y.Z] [--overwrite]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hf_otfusion"
SHORT_DESCRIPTION = "Fuse neural networks with optimal transport"
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".DS_Store")

APP_PY = '''\
"""Hugging Face Space: the hf-otfusion demo (model fusion via optimal transport, Singh & Jaggi 2020).

Space mode: models and datasets are Hub ids or the bundled examples in ./examples, never local paths.
Importing this file builds the app (``demo``); running it (``python app.py``, as a Space does) serves it.
"""

from pathlib import Path

from hf_otfusion.demo import DemoLimits, build_app

HERE = Path(__file__).resolve().parent

demo = build_app(space_mode=True, limits=DemoLimits(), examples_dir=HERE / "examples")

if __name__ == "__main__":
    demo.launch(ssr_mode=False, run_history=False)  # run history would keep inputs (a push token) in the browser
'''

README_BODY = """\
# {title}

Model fusion via optimal transport ([Singh & Jaggi, NeurIPS 2020](https://arxiv.org/abs/1910.05653)) with
hf-otfusion; this Space carries a copy of the package in `hf_otfusion/`.

Pick two or more models (the bundled MNIST examples, or Hub ids of timm / transformers models of one
architecture), choose the alignment (weights or activations), the solver (exact EMD or Sinkhorn) and the
marginals, and press **Fuse**. The Space shows:

- the accuracy table: each parent, the vanilla average of their weights, the prediction ensemble and the fused
  model;
- the accuracy along the straight path between the target and another parent, vanilla vs aligned;
- the transport map of any hidden space (a permutation for exact OT between equal widths);
- the model card of the fused model, which you can download as a zip or push to the Hub with your token (used once,
  never stored).

Limits keep the Space safe: a maximum model size and number of samples, a time limit per fusion, one fusion at a
time (others queue), and no local file paths in user input.

Run it locally instead: `pip install 'hf-otfusion[demo]'` then `hf-otfusion demo`, or `python app.py` in this
folder after `pip install -r requirements.txt gradio`.
"""


def _dependencies() -> list[str]:
    """The package's runtime requirements plus the demo extra's, without gradio (the Space's sdk provides it)."""
    reqs: list[str] = []
    pyproject = ROOT / "pyproject.toml"
    if pyproject.is_file() and sys.version_info >= (3, 11):
        import tomllib

        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        reqs = list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get("demo", []))
    else:  # an installed package (no source tree): read its metadata
        for req in importlib.metadata.requires("hf-otfusion") or []:
            name, _, marker = req.partition(";")
            if not marker or re.search(r"extra\s*==\s*['\"]demo['\"]", marker):
                reqs.append(name.strip())
    return [r for r in dict.fromkeys(reqs) if not re.match(r"^gradio\b", r)]


def requirements_txt() -> str:
    lines = [
        "# Runtime requirements of hf-otfusion (copied into ./hf_otfusion) and of its demo; the Space's sdk_version",
        "# provides gradio. On a CPU-only Space, installing torch's CPU build first saves several GB of CUDA wheels.",
    ]
    return "\n".join(lines + _dependencies()) + "\n"


def readme(title: str, sdk_version: str, models: Sequence[str]) -> str:
    from huggingface_hub import SpaceCard, SpaceCardData

    if len(SHORT_DESCRIPTION) > 60:
        raise ValueError("short_description must be at most 60 characters")
    data = SpaceCardData(
        title=title,
        sdk="gradio",
        sdk_version=sdk_version,
        app_file="app.py",
        python_version="3.11",
        license="apache-2.0",
        models=list(models),
        tags=["model-merging", "optimal-transport", "model-fusion"],
        emoji="🔀",
        colorFrom="indigo",
        colorTo="yellow",
        pinned=False,
        short_description=SHORT_DESCRIPTION,
    )
    card = SpaceCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + README_BODY.format(title=title))
    return str(card).rstrip("\n") + "\n"


def _installed_gradio() -> str | None:
    try:
        return importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        return None


def make_space(out: Path, *, title: str = "hf-otfusion demo", models: Sequence[str] = (),
               sdk_version: str | None = None, overwrite: bool = False, examples: Path | None = None) -> Path:
    """Write the Space folder ``out``; returns it."""
    sdk_version = sdk_version or _installed_gradio()
    if not sdk_version:
        raise SystemExit("gradio is not installed: pass --sdk-version (the gradio version the Space should run)")
    examples = examples or ROOT / "examples"
    for part in ("models", "data"):
        if not (examples / part).is_dir():
            raise SystemExit(f"{examples / part} is missing: the Space needs the bundled example models and data")
    package = _package_dir()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(f"{out} exists and is not empty: pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "app.py").write_text(APP_PY, encoding="utf-8")
    (out / "requirements.txt").write_text(requirements_txt(), encoding="utf-8")
    (out / "README.md").write_text(readme(title, sdk_version, models), encoding="utf-8")
    shutil.copytree(package, out / PACKAGE, ignore=_IGNORE)
    # the card templates, where an installed wheel has them (a source checkout keeps them in ROOT / "model_cards")
    templates = ROOT / "model_cards"
    if templates.is_dir():
        shutil.copytree(templates, out / PACKAGE / "model_cards", ignore=_IGNORE, dirs_exist_ok=True)
    for part in ("models", "data"):
        shutil.copytree(examples / part, out / "examples" / part, ignore=_IGNORE)
    return out


def _package_dir() -> Path:
    source = ROOT / PACKAGE
    if (source / "__init__.py").is_file():
        return source
    import hf_otfusion

    return Path(hf_otfusion.__file__).resolve().parent


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the Space folder to write")
    parser.add_argument("--title", default="hf-otfusion demo")
    parser.add_argument("--model", action="append", default=[], metavar="ORG/NAME",
                        help="a Hub model the Space uses (listed under models: in the front matter); repeatable")
    parser.add_argument("--sdk-version", help="gradio version for the Space (default: the installed gradio)")
    parser.add_argument("--examples", type=Path, help="folder with models/ and data/ (default: the repo's examples/)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT folder")
    args = parser.parse_args(argv)
    out = make_space(args.out, title=args.title, models=args.model, sdk_version=args.sdk_version,
                     overwrite=args.overwrite, examples=args.examples)
    print(f"wrote the Space folder {out}")
    print(f"push it with: hf upload YOUR-NAME/otfusion-demo {out} . --repo-type space")


if __name__ == "__main__":
    main()
