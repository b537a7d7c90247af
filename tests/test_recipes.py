"""The recipes in ``examples/recipes/`` (real seed families on the Hub) against the local Hub test server: each parses,
dry-runs with tiny stand-ins uploaded under the real repo ids, and runs end to end with calibration and evaluation
data served as Hub dataset repos (parquet, with the real datasets' config names and columns)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import timm
import torch
import yaml
from hub_server import HubServer
from typer.testing import CliRunner

from hf_otfusion.cli import app
from hf_otfusion.config import DatasetConfig, load_config, parse_config
from hf_otfusion.data import load_split
from hf_otfusion.merge import merge
from hf_otfusion.testing import VOCAB_SIZE, byte_tokenizer, tiny_bert_mlm

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.yml"))
runner = CliRunner()


def _bert(folder: Path, seed: int) -> Path:
    return tiny_bert_mlm(folder, seed)


def _pythia(folder: Path, seed: int) -> Path:
    """A tiny ``GPTNeoXForCausalLM`` with Pythia's layout (rotary on a quarter of each head, parallel residual)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.25,
                           use_parallel_residual=True, tie_word_embeddings=False, use_cache=False,
                           bos_token_id=257, eos_token_id=258)
    GPTNeoXForCausalLM(config).eval().save_pretrained(folder)
    byte_tokenizer(64).save_pretrained(folder)
    return folder


def _resnet50(folder: Path, seed: int, tag: str = "a1_in1k") -> Path:
    """timm's ``resnet50`` with its real pretrained config (224 px, ImageNet mean/std, 1000 classes), one block
    per stage and narrow channels (``model_args`` in config.json, as timm writes them)."""
    torch.manual_seed(seed)
    args = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}
    model = timm.create_model(f"resnet50.{tag}", pretrained=False, **args)
    timm.models.save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
    return folder


STAND_INS = {
    "google/multiberts-seed_0": lambda f: _bert(f, 0),
    "google/multiberts-seed_1": lambda f: _bert(f, 1),
    "EleutherAI/pythia-160m-seed1": lambda f: _pythia(f, 1),
    "EleutherAI/pythia-160m-seed2": lambda f: _pythia(f, 2),
    "timm/resnet50.a1_in1k": lambda f: _resnet50(f, 0, "a1_in1k"),
    "timm/resnet50.a2_in1k": lambda f: _resnet50(f, 1, "a2_in1k"),
}


def _seed_parents(hub: HubServer, recipe: Path, tmp_path: Path) -> None:
    for entry in load_config(recipe).models:
        assert entry.model in STAND_INS, f"{recipe.name}: no stand-in for {entry.model}"
        hub.seed_repo(entry.model, STAND_INS[entry.model](tmp_path / entry.model.replace("/", "--")))


def test_every_recipe_parses_and_names_hub_repos():
    assert {p.name for p in RECIPES} == {"multiberts-mlm.yml", "pythia-160m-seeds.yml", "resnet50-a1-a2.yml"}
    for recipe in RECIPES:
        config = load_config(recipe)
        assert config.merge_method == "otfusion" and len(config.models) == 2
        assert all(m.model in STAND_INS for m in config.models)
        assert config.calibration is not None and "/" in config.calibration.dataset  # a Hub dataset
        assert f"hf-otfusion merge examples/recipes/{recipe.name}" in recipe.read_text()


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_dry_runs_against_the_hub(hub_server: HubServer, tmp_path, recipe):
    _seed_parents(hub_server, recipe, tmp_path)
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--dry-run", "--quiet"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "dry run: the config is valid and the models load" in result.output
    assert not (tmp_path / "out").exists()
    config = load_config(recipe)
    downloads = {r.path for r in hub_server.find_requests("GET", "/resolve/")}
    assert all(any(m.model in path for path in downloads) for m in config.models)


def test_readme_example_config_is_the_resnet50_recipe():
    """The README's merge example is a coherent config: the ResNet-50 recipe, calibrated on ImageNet images."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Merge models with a YAML config", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    readme = parse_config(yaml.safe_load(block))
    recipe = load_config(ROOT / "examples" / "recipes" / "resnet50-a1-a2.yml")
    assert readme == recipe
    for recipe_path in RECIPES:
        assert f"examples/recipes/{recipe_path.name}" in text


# ---------------------------------------------------------------------------------------------------------------
# Hub datasets for real: parquet dataset repos served by the test server, loaded through `datasets`

WIKITEXT_LINES = [
    "", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a tactical role @-@ playing video game . \n",
    " The game began development in 2010 , carrying over a large portion of the work . \n", "",
    " It met with positive sales in Japan , and was praised by both Japanese and western critics . \n",
    " = = Gameplay = = \n", " As with previous games , the player takes control of a squad . \n",
    " The battles are fought on a map , with units moving in turns . \n",
]


def _parquet(rows: dict) -> bytes:
    buffer = io.BytesIO()
    datasets.Dataset.from_dict(rows).to_parquet(buffer)
    return buffer.getvalue()


def _dataset_card(config: str, splits: list[str]) -> str:
    files = "".join(f"  - split: {s}\n    path: {config}/{s}-*\n" for s in splits)
    return f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n\n# a tiny stand-in\n"


def _serve_wikitext(hub: HubServer) -> None:
    """``Salesforce/wikitext`` as the Hub holds it: one folder of parquet files per config, named in the card."""
    config = "wikitext-2-raw-v1"
    splits = {"train": WIKITEXT_LINES * 2, "validation": WIKITEXT_LINES[:5], "test": WIKITEXT_LINES[3:]}
    files = {f"{config}/{split}-00000-of-00001.parquet": _parquet({"text": lines}) for split, lines in splits.items()}
    hub.seed_repo("Salesforce/wikitext", {"README.md": _dataset_card(config, list(splits)), **files},
                  repo_type="dataset")


def _serve_imagenette(hub: HubServer, n: int = 12) -> None:
    """``frgfm/imagenette`` (config ``320px``): JPEG images and 10 class labels."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        buffer = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    table = datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(n)]}, features=features)
    buffer = io.BytesIO()
    table.to_parquet(buffer)
    hub.seed_repo("frgfm/imagenette", {"README.md": _dataset_card("320px", ["train"]),
                                       "320px/train-00000-of-00001.parquet": buffer.getvalue()}, repo_type="dataset")


def test_hub_dataset_loads_through_the_server(hub_server: HubServer):
    _serve_wikitext(hub_server)
    test = load_split(DatasetConfig(dataset="Salesforce/wikitext", name="wikitext-2-raw-v1", split="test"))
    assert test["text"] == WIKITEXT_LINES[3:]
    assert hub_server.find_requests(contains="/datasets/Salesforce/wikitext/resolve/")
    sampled = load_split(DatasetConfig(dataset="Salesforce/wikitext", name="wikitext-2-raw-v1", num_samples=4))
    assert len(sampled) == 4 and set(sampled["text"]) <= set(WIKITEXT_LINES)


def test_multiberts_recipe_calibrates_and_evaluates_on_a_hub_dataset(hub_server: HubServer, tmp_path):
    recipe = ROOT / "examples" / "recipes" / "multiberts-mlm.yml"
    _seed_parents(hub_server, recipe, tmp_path)
    _serve_wikitext(hub_server)
    result = merge(load_config(recipe), tmp_path / "out", progress=False)
    rows = {row.kind: row for row in result.evaluation if row.kind in ("parent", "vanilla", "ensemble", "fused")}
    assert set(rows) == {"parent", "vanilla", "ensemble", "fused"}
    assert rows["fused"].perplexity is not None and rows["fused"].tokens > 0  # masked-LM perplexity
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Salesforce/wikitext" in card and "perplexity" in card.lower()
    assert hub_server.find_requests(contains="/datasets/Salesforce/wikitext/resolve/")
    # the merged model's numbers as Hub evaluation results, one file per metric
    from huggingface_hub import parse_eval_result_entries

    files = sorted((tmp_path / "out" / ".eval_results").iterdir())
    assert [f.name for f in files] == ["wikitext_loss.yaml", "wikitext_perplexity.yaml"]
    entry, = parse_eval_result_entries(yaml.safe_load(files[1].read_text()))
    assert entry.dataset_id == "Salesforce/wikitext" and entry.task_id == "wikitext-2-raw-v1"
    assert entry.value == pytest.approx(rows["fused"].perplexity, rel=1e-5) and "split 'test'" in entry.notes


def test_resnet50_recipe_calibrates_on_a_hub_image_dataset(hub_server: HubServer, tmp_path):
    recipe = ROOT / "examples" / "recipes" / "resnet50-a1-a2.yml"
    _seed_parents(hub_server, recipe, tmp_path)
    _serve_imagenette(hub_server)
    merge(load_config(recipe), tmp_path / "out", progress=False)
    fused = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert fused(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    assert hub_server.find_requests(contains="/datasets/frgfm/imagenette/resolve/")
