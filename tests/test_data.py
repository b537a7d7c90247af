"""In-memory loaders; datasets from local files with each library's preprocessing; the examples."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import PIL.Image
import pytest
import timm
import torch
from transformers import BertTokenizer, ViTImageProcessor

from hf_otfusion import data as data_mod
from hf_otfusion.config import DatasetConfig, load_config
from hf_otfusion.data import DataError, load_split, make_loader, make_loader_for_model
from hf_otfusion.evaluate import accuracy
from hf_otfusion.testing import load_mnist_5k


def test_make_loader_batches_and_seeded_shuffle():
    x = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(10)
    batches = list(make_loader(x, y, batch_size=4))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)

    def order(seed: int) -> list[int]:
        return torch.cat([b[1] for b in make_loader(x, y, batch_size=3, shuffle=True, seed=seed)]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == list(range(10))
    with pytest.raises(ValueError, match="differ in length"):
        make_loader(x, y[:5], batch_size=2)


# ---------------------------------------------------------------------------------------------------------------------
# load_split / make_loader_for_model on tiny local datasets
# ---------------------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
DIGIT_NAMES = [str(i) for i in range(10)]


def _images(n: int, size: int = 28, seed: int = 0) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L") for _ in range(n)]


def _image_dataset(n: int, seed: int = 0, size: int = 28) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGIT_NAMES)})
    labels = [i % 10 for i in range(n)]
    return datasets.Dataset.from_dict({"image": _images(n, size, seed), "label": labels}).cast(features)


@pytest.fixture
def parquet_dir(tmp_path) -> Path:
    folder = tmp_path / "digits"
    folder.mkdir()
    _image_dataset(12, seed=0).to_parquet(str(folder / "train.parquet"))
    _image_dataset(5, seed=1).to_parquet(str(folder / "test.parquet"))
    return folder


def _cfg(dataset: str | Path, **kw) -> DatasetConfig:
    return DatasetConfig(dataset=str(dataset), **kw)


def test_parquet_folder_splits_come_from_file_names(parquet_dir):
    test = load_split(_cfg(parquet_dir, split="test"))
    assert len(test) == 5 and len(load_split(_cfg(parquet_dir))) == 12
    assert isinstance(test.features["image"], datasets.Image)
    assert test.features["label"] == datasets.ClassLabel(names=DIGIT_NAMES)
    assert test[0]["image"].size == (28, 28)


def test_single_parquet_file_is_split_train(parquet_dir):
    ds = load_split(_cfg(parquet_dir / "test.parquet"))
    assert len(ds) == 5 and ds.features["label"].names == DIGIT_NAMES
    with pytest.raises(DataError, match=r"no split 'test'.*available splits: train"):
        load_split(_cfg(parquet_dir / "test.parquet", split="test"))


def test_csv_and_json_files_and_a_csv_folder(tmp_path):
    table = {"text": ["a cat", "the dog", "hello", "world"], "label": [0, 1, 0, 1]}
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    datasets.Dataset.from_dict(table).to_csv(str(csv_dir / "train.csv"))
    datasets.Dataset.from_dict(table).to_json(str(tmp_path / "rows.jsonl"))
    for source in (csv_dir / "train.csv", csv_dir, tmp_path / "rows.jsonl"):
        ds = load_split(_cfg(source))
        assert ds["text"] == table["text"] and ds["label"] == table["label"], source


def test_imagefolder_with_class_subfolders(tmp_path):
    for cls, seed in (("cat", 0), ("dog", 1)):
        folder = tmp_path / "pets" / "train" / cls
        folder.mkdir(parents=True)
        for i, img in enumerate(_images(3, size=10, seed=seed)):
            img.save(folder / f"{i}.png")
    ds = load_split(_cfg(tmp_path / "pets"))
    assert len(ds) == 6
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"].names == ["cat", "dog"]


def test_save_to_disk_folders(tmp_path):
    single = _image_dataset(4)
    single.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": single, "validation": _image_dataset(3)}).save_to_disk(str(tmp_path / "two"))
    assert len(load_split(_cfg(tmp_path / "one"))) == 4
    assert len(load_split(_cfg(tmp_path / "two", split="validation"))) == 3
    with pytest.raises(DataError, match=r"no split 'test'.*train, validation"):
        load_split(_cfg(tmp_path / "two", split="test"))


def test_num_samples_is_a_seeded_subset(parquet_dir):
    def labels(**kw) -> list[int]:
        return load_split(_cfg(parquet_dir, **kw))["label"]

    assert labels(num_samples=6, seed=0) == labels(num_samples=6, seed=0)
    assert labels(num_samples=6, seed=0) != labels(num_samples=6, seed=1)
    assert len(labels(num_samples=6)) == 6
    assert labels(num_samples=100) == load_split(_cfg(parquet_dir)).shuffle(seed=0)["label"]  # all 12 rows
    assert labels() == [i % 10 for i in range(12)]  # without num_samples: file order


def test_missing_local_paths(tmp_path):
    for name in (str(tmp_path / "nope"), "./nope", "data/sub/nope", "nope.parquet"):
        with pytest.raises(DataError, match=r"no such file or folder"):
            load_split(_cfg(name))


def test_hub_name_offline_and_unusable_local_data(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"cannot load dataset 'nobody/nothing-here'"):
        load_split(_cfg("nobody/nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no data files"):
        load_split(_cfg(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported data file type '.txt'"):
        load_split(_cfg(tmp_path / "notes.txt"))


def test_empty_split(tmp_path, monkeypatch):
    (tmp_path / "header_only.csv").write_text("text,label\n")
    with pytest.raises(DataError, match=r"'.*header_only.csv': a split is empty"):
        load_split(_cfg(tmp_path / "header_only.csv"))
    # datasets cannot load an empty split from disk at all; a Hub dataset can have one.
    empty = datasets.Dataset.from_dict({"text": [], "label": []})
    monkeypatch.setattr(data_mod, "_load_hub", lambda cfg: empty)
    with pytest.raises(DataError, match=r"'some/dataset': split 'test' is empty"):
        load_split(_cfg("some/dataset", split="test"))


def _gray_timm(size: int = 28) -> torch.nn.Module:
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "input_size": (1, size, size),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5,),
        "std": (0.5,),
    }
    return model


def test_column_errors_name_dataset_and_columns(parquet_dir):
    model = _gray_timm()
    with pytest.raises(DataError, match=r"digits' \(split 'train'\) has no column 'pixels'; its columns: image, label"):
        make_loader_for_model(_cfg(parquet_dir, image_column="pixels"), library="timm", model=model, model_dir=None)
    with pytest.raises(DataError, match=r"no column 'y'"):
        make_loader_for_model(_cfg(parquet_dir, label_column="y"), library="timm", model=model, model_dir=None)
    with pytest.raises(DataError, match=r"not both"):
        make_loader_for_model(
            _cfg(parquet_dir, image_column="image", text_column="label"), library="timm", model=model, model_dir=None
        )
    with pytest.raises(DataError, match=r"unknown library 'keras'"):
        make_loader_for_model(_cfg(parquet_dir), library="keras", model=model, model_dir=None)


def test_no_labels(tmp_path):
    datasets.Dataset.from_dict({"image": _images(3)}).cast_column("image", datasets.Image()).to_parquet(
        str(tmp_path / "unlabelled.parquet")
    )
    cfg = _cfg(tmp_path / "unlabelled.parquet")
    with pytest.raises(DataError, match=r"unlabelled.parquet.*no label column"):
        make_loader_for_model(cfg, library="timm", model=_gray_timm(), model_dir=None)
    x, y = next(
        iter(make_loader_for_model(cfg, library="timm", model=_gray_timm(), model_dir=None, require_labels=False))
    )
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [-1, -1, -1]


def test_bad_labels(tmp_path):
    names = datasets.Dataset.from_dict({"image": _images(2), "label": ["cat", "dog"]}).cast_column(
        "image", datasets.Image()
    )
    names.save_to_disk(str(tmp_path / "names"))
    with pytest.raises(DataError, match=r"label column 'label' is .*string.*not integer class ids"):
        make_loader_for_model(_cfg(tmp_path / "names"), library="timm", model=_gray_timm(), model_dir=None)
    many = _image_dataset(3).cast_column("label", datasets.ClassLabel(num_classes=20))
    many.save_to_disk(str(tmp_path / "many"))
    with pytest.raises(DataError, match=r"20 classes but the model predicts 10"):
        make_loader_for_model(_cfg(tmp_path / "many"), library="timm", model=_gray_timm(), model_dir=None)
    missing = _image_dataset(3).cast_column("label", datasets.Value("int64")).map(lambda r: {"label": -1})
    missing.save_to_disk(str(tmp_path / "missing"))
    loader = make_loader_for_model(_cfg(tmp_path / "missing"), library="timm", model=_gray_timm(), model_dir=None)
    with pytest.raises(DataError, match=r"rows without a label"):
        next(iter(loader))


def test_column_detection():
    cfg = _cfg("x")
    both = datasets.Dataset.from_dict({"caption": ["a"], "img": [[0]], "target": [1]})
    assert data_mod._resolve_columns(both, cfg, True) == data_mod._Columns("img", "image", "target")
    text = datasets.Dataset.from_dict({"id": [3], "sentence": ["hi"], "fine": [0]}).cast_column(
        "fine", datasets.ClassLabel(names=["a", "b"])
    )
    assert data_mod._resolve_columns(text, cfg, True) == data_mod._Columns("sentence", "text", "fine")
    first_string = datasets.Dataset.from_dict({"review": ["good"], "labels": [1]})
    assert data_mod._resolve_columns(first_string, cfg, True) == data_mod._Columns("review", "text", "labels")
    chosen = _cfg("x", text_column="caption", label_column="target")
    assert data_mod._resolve_columns(both, chosen, True) == data_mod._Columns("caption", "text", "target")
    with pytest.raises(DataError, match=r"no image or text column"):
        data_mod._resolve_columns(datasets.Dataset.from_dict({"a": [1]}), cfg, False)
    numbers = datasets.Dataset.from_dict({"text": [1, 2], "label": [0, 1]})  # named text, holds integers
    with pytest.raises(DataError, match=r"text column 'text' holds .*int64.*, not text"):
        data_mod._resolve_columns(numbers, _cfg("x", text_column="text"), False)


def test_timm_preprocessing_gray_and_rgb(parquet_dir):
    loader = make_loader_for_model(_cfg(parquet_dir, batch_size=5), library="timm", model=_gray_timm(), model_dir=None)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [5, 5, 2]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (5, 1, 28, 28) and y.dtype == torch.int64
    rows = load_split(_cfg(parquet_dir))
    pixels = torch.from_numpy(np.stack([np.asarray(img) for img in rows["image"][:5]])).float() / 255
    assert torch.allclose(x[:, 0], (pixels - 0.5) / 0.5, atol=1e-6)  # 28x28 in, 28x28 out: pixels unchanged
    rgb = timm.create_model("test_resnet", num_classes=10).eval()
    rgb.pretrained_cfg = {**rgb.pretrained_cfg, "input_size": (3, 20, 20)}
    x, _ = next(iter(make_loader_for_model(_cfg(parquet_dir, batch_size=2), library="timm", model=rgb, model_dir=None)))
    assert x.shape == (2, 3, 20, 20)
    assert torch.equal(x[:, 0], x[:, 1])  # a gray image in three equal channels


def test_timm_rejects_text(tmp_path):
    datasets.Dataset.from_dict({"text": ["a"], "label": [0]}).to_csv(str(tmp_path / "t.csv"))
    with pytest.raises(DataError, match=r"is text, but timm models take images"):
        make_loader_for_model(_cfg(tmp_path / "t.csv"), library="timm", model=_gray_timm(), model_dir=None)


def test_transformers_image_processor(parquet_dir, tmp_path):
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(str(tmp_path / "vit"))
    model = torch.nn.Identity()
    loader = make_loader_for_model(
        _cfg(parquet_dir, split="test", batch_size=4), library="transformers", model=model, model_dir=tmp_path / "vit"
    )
    (x, y), (x2, _) = list(loader)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and x2.shape == (1, 3, 16, 16)
    assert y.tolist() == [0, 1, 2, 3]
    images = [img.convert("RGB") for img in load_split(_cfg(parquet_dir, split="test"))["image"][:4]]
    assert torch.allclose(x, processor(images=images, return_tensors="pt")["pixel_values"])
    with pytest.raises(DataError, match=r"needs its folder"):
        make_loader_for_model(_cfg(parquet_dir), library="transformers", model=model, model_dir=None)
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match=r"holds images, but '.*bare' has no image processor"):
        make_loader_for_model(_cfg(parquet_dir), library="transformers", model=model, model_dir=tmp_path / "bare")


class _TextModel(torch.nn.Module):
    """Only the config matters to the loader: the position limit caps the token length."""

    def __init__(self, max_positions: int):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=max_positions, num_labels=2)


def test_transformers_tokenizer(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5: BertTokenizerFast(vocab_file=...) ignores the file; ``vocab`` takes the path.
    BertTokenizer(vocab=str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path / "tok"))
    texts = ["the cat", "the cats sat on the mat", "mat", "cat sat"]
    datasets.Dataset.from_dict({"sentence": texts, "label": [0, 1, 0, 1]}).to_json(str(tmp_path / "s.jsonl"))
    cfg = _cfg(tmp_path / "s.jsonl", batch_size=3)
    (x, y), (x2, y2) = list(
        make_loader_for_model(cfg, library="transformers", model=_TextModel(6), model_dir=tmp_path / "tok")
    )
    assert set(x) == {"input_ids", "attention_mask", "token_type_ids"}
    assert x["input_ids"].tolist() == [[2, 5, 6, 3, 0, 0], [2, 5, 6, 10, 7, 3], [2, 9, 3, 0, 0, 0]]  # cut at 6
    assert x["attention_mask"].tolist()[0] == [1, 1, 1, 1, 0, 0]
    assert x2["input_ids"].tolist() == [[2, 6, 7, 3]]  # padded to the longest of its own batch only
    assert y.tolist() == [0, 1, 0] and y2.tolist() == [1]
    with pytest.raises(DataError, match=r"holds text, but '.*vocab.txt' has no tokenizer"):
        make_loader_for_model(cfg, library="transformers", model=_TextModel(6), model_dir=tmp_path / "vocab.txt")


# ---------------------------------------------------------------------------------------------------------------------
# The committed offline example (scripts/make_examples.py)
# ---------------------------------------------------------------------------------------------------------------------


def test_examples_checkpoints_load_and_reproduce_the_training_inputs(monkeypatch):
    monkeypatch.chdir(ROOT)
    split = load_mnist_5k()
    models = [timm.create_model(f"local-dir:examples/models/mnist-resnet-seed{s}", pretrained=True) for s in (0, 1)]
    for model in models:
        assert model.num_classes == 10 and model.pretrained_cfg["input_size"] == (1, 28, 28)
    cfg = DatasetConfig(dataset="examples/data/mnist", split="test", batch_size=250)
    loader = make_loader_for_model(cfg, library="timm", model=models[0], model_dir=None)
    x, y = next(iter(loader))
    # Same images and labels, in the same order, and the same normalisation as in training.
    assert torch.equal(y, split.y_test[:250])
    assert torch.allclose(x, (split.x_test[:250] - 0.5) / 0.5, atol=1e-6)
    for model in models:
        assert accuracy(model.eval(), (x, y)) > 0.9


def test_examples_configs_validate(monkeypatch):
    monkeypatch.chdir(ROOT)
    ot = load_config("examples/mnist-otfusion.yml")
    assert ot.merge_method == "otfusion" and ot.fusion_parameters.alignment == "activations"
    linear = load_config("examples/mnist-linear.yml")
    assert linear.merge_method == "linear"
    for cfg in (ot, linear):
        for entry in cfg.models:
            assert Path(entry.model, "config.json").is_file() and Path(entry.model, "model.safetensors").is_file()
    assert ot.calibration.num_samples == len(load_split(ot.calibration)) == 1000
    for data_cfg in (ot.evaluation, linear.evaluation):
        assert data_cfg.split == "test" and data_cfg.num_samples is None  # the whole test split, in file order
        assert len(load_split(data_cfg)) == 1000


# ---------------------------------------------------------------------------------------------------------------------
# Text for language models: the standard-library text set, LM batches, calibration inputs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    from hf_otfusion.testing import tiny_bert_mlm, tiny_llama

    root = tmp_path_factory.mktemp("lms")
    return {"causal": tiny_llama(root / "llama", seed=0), "masked": tiny_bert_mlm(root / "bert", seed=0)}


def _lm_loader(folder, kind, lm_dirs, **kw):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    model = auto.from_pretrained(str(lm_dirs[kind]))
    require = kw.pop("require_labels", True)
    fixed = kw.pop("fixed_length", False)
    return make_loader_for_model(_cfg(folder, **kw), library="transformers", model=model, model_dir=lm_dirs[kind],
                                 require_labels=require, fixed_length=fixed)


def test_causal_lm_batches_need_no_label_column(tmp_path, lm_dirs):
    texts = ["abc", "hello world", "x", "def f(): pass"]
    # a label column of strings would be refused for a classifier; a language model ignores it
    datasets.Dataset.from_dict({"text": texts, "label": ["a", "b", "c", "d"]}).to_parquet(str(tmp_path / "t.parquet"))
    (x, y), (x2, y2) = list(_lm_loader(tmp_path / "t.parquet", "causal", lm_dirs, batch_size=3))
    assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].shape == (3, 11)
    assert x["input_ids"][0, :3].tolist() == [97, 98, 99] and x["attention_mask"][0].tolist() == [1] * 3 + [0] * 8
    assert torch.equal(y, x["input_ids"].masked_fill(x["attention_mask"] == 0, -100))  # token labels, pads -100
    assert x2["input_ids"].shape == (1, 13) and torch.equal(y2, x2["input_ids"])
    fixed = list(_lm_loader(tmp_path / "t.parquet", "causal", lm_dirs, batch_size=3, fixed_length=True))
    assert [b[0]["input_ids"].shape[1] for b in fixed] == [13, 13]  # one length for the whole split
    datasets.Dataset.from_dict({"image": _images(2)}).to_parquet(str(tmp_path / "i.parquet"))
    with pytest.raises(DataError, match="a language model reads text"):
        _lm_loader(tmp_path / "i.parquet", "causal", lm_dirs)


def test_masked_lm_batches_are_masked_the_same_way_every_pass(tmp_path, lm_dirs):
    from hf_otfusion.testing import stdlib_text

    texts = stdlib_text(40, 6)
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "t.parquet"))
    loader = _lm_loader(tmp_path / "t.parquet", "masked", lm_dirs, batch_size=4)
    first, second = list(loader), list(loader)
    for (x, y), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x["input_ids"], x2["input_ids"]) and torch.equal(y, y2)
    x, y = first[0]
    chosen = y != -100
    assert (chosen.sum(1) == 6).all()  # round(0.15 * 40) of each row's 40 byte tokens (specials are never masked)
    assert bool((x["input_ids"][chosen] == 259).all())  # the tokenizer's <mask>
    other = list(_lm_loader(tmp_path / "t.parquet", "masked", lm_dirs, batch_size=2))  # other batches, same rows
    assert torch.equal(torch.cat([b[1] for b in other]), torch.cat([b[1] for b in first]))
    x, y = next(iter(_lm_loader(tmp_path / "t.parquet", "masked", lm_dirs, require_labels=False)))
    assert bool((y == -100).all()) and not bool((x["input_ids"] == 259).any())  # calibration: unmasked


def test_activations_merge_on_text_calibrates_a_causal_lm(tmp_path):
    """A calibration loader's (inputs, labels) batches reach the activation statistics as inputs, at one length."""
    from hf_otfusion import merge
    from hf_otfusion.config import parse_config
    from hf_otfusion.testing import stdlib_text_dataset, tiny_llama

    data = stdlib_text_dataset(tmp_path / "text", length=32, num_train=6, num_test=2)
    parents = [tiny_llama(tmp_path / f"lm{s}", seed=s) for s in (0, 1)]
    config = parse_config({"models": [{"model": str(p)} for p in parents], "parameters": {"alignment": "activations"},
                           "calibration": {"dataset": str(data), "batch_size": 4}})
    result = merge(config, tmp_path / "out", progress=False)
    assert result.model is not None and (tmp_path / "out" / "model.safetensors").is_file()


def test_calibration_inputs_the_model_cannot_take_are_a_data_error():
    import importlib

    merge_mod = importlib.import_module("hf_otfusion.merge.inputs")

    class Takes(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    target = SimpleNamespace(model=Takes(), ref=SimpleNamespace(text="some/model"), architecture="Takes")
    ids = torch.zeros(2, 3, dtype=torch.int64)
    merge_mod._check_inputs({"input_ids": ids, "attention_mask": ids}, target, "d")  # fine
    with pytest.raises(DataError, match=r"gives the inputs 'input_ids', 'token_type_ids'.*takes no 'token_type_ids'"):
        merge_mod._check_inputs({"input_ids": ids, "token_type_ids": ids}, target, "d")
    with pytest.raises(DataError, match=r"needs 'input_ids'"):
        merge_mod._check_inputs({"pixel_values": ids, "attention_mask": ids}, SimpleNamespace(
            model=type("K", (torch.nn.Module,), {"forward": lambda self, input_ids, **kw: input_ids})(),
            ref=target.ref, architecture="K"), "d")
