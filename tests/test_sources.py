"""Model references, loading timm/transformers models from folders and the Hub, saving them back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from checkpoints import hf_resnet, hf_vit, timm_resnet
from hub_server import HubServer
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from hf_otfusion.sources import ModelRef, SourceError, example_input, load_model, parse_ref, save_model


@pytest.mark.parametrize(
    ("text", "repo_id", "revision"),
    [
        ("timm/resnet18.a1_in1k", "timm/resnet18.a1_in1k", None),
        ("hf-hub:timm/resnet18.a1_in1k", "timm/resnet18.a1_in1k", None),
        ("org/model@v1.0", "org/model", "v1.0"),
        ("gpt2", "gpt2", None),
    ],
)
def test_parse_hub_refs(text, repo_id, revision):
    ref = parse_ref(text)
    assert (ref.repo_id, ref.revision, ref.is_local) == (repo_id, revision, False)


def test_parse_local_refs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    assert parse_ref("org/model").path == Path("org/model")  # an existing folder wins over a Hub id
    assert parse_ref("local-dir:somewhere").path == Path("somewhere")
    assert parse_ref("./x").is_local and parse_ref("/abs/x").is_local


@pytest.mark.parametrize("text", ["", "a b", "x/y/z", "org/name@", "@rev"])
def test_parse_bad_refs(text):
    with pytest.raises(SourceError):
        parse_ref(text)


def test_load_timm_folder(tmp_path):
    folder = timm_resnet(tmp_path / "m", seed=0)
    loaded = load_model(folder)
    assert (loaded.library, loaded.architecture, loaded.pipeline_tag) == ("timm", "test_resnet", "image-classification")
    assert loaded.auto_class is None and not loaded.model.training
    x = example_input(loaded)
    assert x.shape == (2, 3, 16, 16)
    reference = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    torch.testing.assert_close(loaded.model(x), reference(x))


@pytest.mark.parametrize("make", [hf_vit, hf_resnet], ids=["vit", "resnet"])
def test_load_transformers_folder(tmp_path, make):
    folder = make(tmp_path / "m", seed=0)
    loaded = load_model(f"local-dir:{folder}")
    assert loaded.library == "transformers"
    assert loaded.pipeline_tag == "image-classification"
    assert loaded.auto_class == "AutoModelForImageClassification"
    x = example_input(loaded)
    assert x.shape == (2, 3, 16, 16)
    reference = AutoModelForImageClassification.from_pretrained(folder).eval()
    torch.testing.assert_close(loaded.model(x).logits, reference(x).logits)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_timm_round_trip(tmp_path, dtype):
    loaded = load_model(timm_resnet(tmp_path / "m", seed=0))
    save_model(loaded.model, tmp_path / "out", like=loaded, dtype=dtype)
    assert next(loaded.model.parameters()).dtype == torch.float32  # the caller's model is not cast
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert stored["fc.weight"].dtype == getattr(torch, dtype)
    again = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = example_input(loaded)
    tol = {} if dtype == "float32" else {"atol": 0.05, "rtol": 0.05}
    torch.testing.assert_close(again.float()(x), loaded.model(x), **tol)


def test_save_transformers_copies_processor(tmp_path):
    loaded = load_model(hf_vit(tmp_path / "m", seed=0))
    save_model(loaded.model, tmp_path / "out", like=loaded)
    assert (tmp_path / "out" / "preprocessor_config.json").read_text() == (
        tmp_path / "m" / "preprocessor_config.json"
    ).read_text()
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    x = example_input(loaded)
    torch.testing.assert_close(again(x).logits, loaded.model(x).logits)


def test_missing_folder(tmp_path):
    with pytest.raises(SourceError, match="model folder not found"):
        load_model(f"local-dir:{tmp_path / 'nope'}")


def test_folder_without_config(tmp_path):
    with pytest.raises(SourceError, match="has no config.json"):
        load_model(tmp_path)


def test_unknown_library(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden": 3}))
    with pytest.raises(SourceError, match="unknown library"):
        load_model(tmp_path)


def test_unknown_transformers_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "architectures": ["NoSuchModel"]}))
    with pytest.raises(SourceError, match="unknown architecture 'NoSuchModel'"):
        load_model(tmp_path)


def test_unknown_timm_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "no_such_net", "num_classes": 3}))
    with pytest.raises(SourceError, match="cannot load .* with timm \\(no_such_net\\)"):
        load_model(tmp_path)


def test_offline_hub_ref_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="not in the local cache"):
        load_model("org/never-downloaded")


def test_load_from_hub(hub_server: HubServer, tmp_path):
    folder = timm_resnet(tmp_path / "m", seed=0)
    hub_server.seed_repo("org/tiny", folder)
    hub_server.seed_repo("org/tiny", timm_resnet(tmp_path / "m1", seed=1), revision="v1")
    main, v1 = load_model("org/tiny"), load_model(ModelRef(text="org/tiny@v1", repo_id="org/tiny", revision="v1"))
    x = example_input(main)
    local = load_model(folder)
    torch.testing.assert_close(main.model(x), local.model(x))
    assert not torch.allclose(v1.model(x), main.model(x))
    assert load_model("hf-hub:org/tiny").architecture == "test_resnet"


def test_hub_errors(hub_server: HubServer, tmp_path):
    with pytest.raises(SourceError, match="'org/missing' not found on the Hub"):
        load_model("org/missing")
    hub_server.seed_repo("org/tiny", timm_resnet(tmp_path / "m", seed=0))
    with pytest.raises(SourceError, match="has no revision 'nope'"):
        load_model("org/tiny@nope")
