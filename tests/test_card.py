"""The README.md model card: front matter, body sections, honesty about what was (not) measured."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

import hf_otfusion
from hf_otfusion.card import TEMPLATE_PATH, is_local_dataset, render_card
from hf_otfusion.config import MergeConfig, parse_config
from hf_otfusion.evaluate import EvalRow, format_table

ROWS = [
    EvalRow(name="parent 0", kind="parent", accuracy=0.9123, loss=0.3456),
    EvalRow(name="parent 1", kind="parent", accuracy=0.8877, loss=0.4012),
    EvalRow(name="vanilla average", kind="vanilla", accuracy=0.1034, loss=2.2981),
    EvalRow(name="ensemble", kind="ensemble", accuracy=0.9311, loss=0.2789),
    EvalRow(name="OT fusion", kind="fused", accuracy=0.9046, loss=0.3321),
]


def _config(**overrides: object) -> MergeConfig:
    data: dict[str, object] = {
        "merge_method": "otfusion",
        "base_model": "org/b@v2",
        "models": [
            {"model": "timm/resnet18.a1_in1k", "parameters": {"weight": 1.0}},
            {"model": "org/b@v2", "parameters": {"weight": 3.0}},
            {"model": "./parents/local-c"},
            {"model": "hf-hub:timm/resnet18.a1_in1k"},
        ],
        "parameters": {"alignment": "activations", "solver": "sinkhorn", "reg": 0.1, "marginals": "importance"},
        "calibration": {"dataset": "ylecun/mnist", "split": "train", "num_samples": 512},
        "evaluation": {"dataset": "ylecun/mnist", "split": "test", "num_samples": 1000, "seed": 3},
    }
    data.update(overrides)
    return parse_config(data)


def _front_matter(card: ModelCard) -> dict:
    text = str(card)
    match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, text[:200]
    parsed = yaml.safe_load(match[1])
    assert ModelCard(text).data.to_dict() == parsed
    return parsed


def _section(card: ModelCard, title: str) -> str:
    """Body of a ``## title`` section (up to the next ``## `` heading)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", card.text, re.DOTALL | re.MULTILINE)
    assert match, f"no section {title!r} in:\n{card.text}"
    return match[1]


def test_front_matter_has_every_field() -> None:
    card = render_card(_config(), library="timm", pipeline_tag="image-classification", repo_id="me/fused")
    meta = _front_matter(card)
    # Hub parents only, without @revision, de-duplicated in order; the local parent is left out.
    assert meta["base_model"] == ["timm/resnet18.a1_in1k", "org/b"]
    assert meta["base_model_relation"] == "merge"
    assert meta["tags"] == ["hf-otfusion", "merge", "optimal-transport", "timm"]
    assert meta["library_name"] == "timm"
    assert meta["pipeline_tag"] == "image-classification"
    assert meta["datasets"] == ["ylecun/mnist"]
    assert "license" not in meta


def test_optional_fields_are_left_out() -> None:
    config = _config(
        models=[{"model": "./a"}, {"model": "/abs/b"}],
        base_model=None,
        calibration={"dataset": "data/calib.parquet"},
        evaluation={"dataset": "~/eval"},
    )
    meta = _front_matter(render_card(config, library="transformers", pipeline_tag=None))
    assert meta == {
        "library_name": "transformers",
        "tags": ["hf-otfusion", "merge", "optimal-transport", "transformers"],
    }


@pytest.mark.parametrize(
    ("dataset", "local"),
    [
        ("ylecun/mnist", False),
        ("mnist", False),
        ("/data/mnist", True),
        ("./mnist", True),
        ("../mnist", True),
        ("~/mnist", True),
        ("test.parquet", True),
        ("data/test.csv", True),
        ("test.json", True),
        ("data/test.jsonl", True),
    ],
)
def test_local_dataset_detection(dataset: str, local: bool) -> None:
    assert is_local_dataset(dataset) is local


def test_existing_relative_dataset_folder_is_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org" / "digits").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert is_local_dataset("org/digits")
    config = _config(calibration={"dataset": "org/digits"}, evaluation=None)
    assert "datasets" not in _front_matter(render_card(config, library="timm", pipeline_tag=None))


def test_parents_table_and_local_parent_in_body() -> None:
    card = render_card(_config(), library="timm", pipeline_tag=None)
    parents = _section(card, "Parents")
    lines = [line for line in parents.splitlines() if re.match(r"^\| \d", line)]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    # weights 1, 3, 1 (default), 1 → 16.67%, 50%, 16.67%, 16.67%; the target is org/b at revision v2.
    assert "timm/resnet18.a1_in1k" in rows[0][1] and rows[0][2:5] == ["main", "not recorded", "16.67%"]
    assert "org/b" in rows[1][1] and rows[1][2:5] == ["v2", "not recorded", "50%"] and rows[1][5].startswith("target")
    assert "./parents/local-c" in rows[2][1] and rows[2][2:4] == ["local", "not on the Hub"]
    assert "hf-hub" not in rows[3][1] and "timm/resnet18.a1_in1k" in rows[3][1]
    assert [row[5].startswith("target") for row in rows] == [False, True, False, False]


def test_parents_table_shows_the_resolved_commits() -> None:
    a, b = "a" * 40, "0123456789abcdef0123456789abcdef01234567"
    card = render_card(_config(), library="timm", pipeline_tag=None, commits=[a, b, None, a])
    lines = [line for line in _section(card, "Parents").splitlines() if re.match(r"^\| \d", line)]
    commits = [line.strip("|").split("|")[3].strip() for line in lines]
    assert commits == [
        f"[`{a}`](https://huggingface.co/timm/resnet18.a1_in1k/tree/{a})",
        f"[`{b}`](https://huggingface.co/org/b/tree/{b})",
        "not on the Hub",
        f"[`{a}`](https://huggingface.co/timm/resnet18.a1_in1k/tree/{a})",
    ]
    assert "| v2 |" in card.text  # the revision asked for stays beside the commit it resolved to
    with pytest.raises(ValueError, match="one commit"):
        render_card(_config(), library="timm", pipeline_tag=None, commits=[a])
    with pytest.raises(ValueError, match="40-digit"):
        render_card(_config(), library="timm", pipeline_tag=None, commits=["main", b, None, a])


def test_otfusion_wording_and_options() -> None:
    card = render_card(_config(), library="timm", pipeline_tag=None)
    assert "https://arxiv.org/abs/1910.05653" in card.text
    assert "Model Fusion via Optimal Transport" in card.text and "NeurIPS 2020" in card.text
    assert "optimal transport map" in card.text and "vanilla" not in card.text.split("## Parents")[0]
    options = _section(card, "Fusion options")
    for expected in ("| alignment | activations |", "sinkhorn", "| reg | 0.1", "| marginals | importance |"):
        assert expected in options
    assert "ylecun/mnist" in options and "512 samples" in options
    assert f"hf-otfusion {hf_otfusion.__version__}" in card.text

    emd = render_card(_config(parameters=None, calibration=None), library="timm", pipeline_tag=None)
    options = _section(emd, "Fusion options")
    assert "| alignment | weights |" in options and "emd" in options and "reg" not in options
    assert "calibration" not in options


def test_solver_and_repair_are_described_from_the_registries() -> None:
    from hf_otfusion.registry import REPAIRS, SOLVERS

    card = render_card(_config(parameters={"repair": "refit", "repair_parameters": {"alpha": 0.01}}), library="timm",
                       pipeline_tag=None)
    options = _section(card, "Fusion options")
    assert f"| solver | emd ({SOLVERS.get('emd').description}) |" in options
    assert f"| repair | refit ({REPAIRS.get('refit').description}) |" in options
    assert "| repair parameters | alpha=0.01, prior=fused, target=layer |" in options
    assert "repair_parameters:\n    alpha: 0.01" in _section(card, "Merge config")  # as set, not the defaults
    plain = _section(render_card(_config(parameters={"repair": "none"}, calibration=None), library="timm",
                                 pipeline_tag=None), "Fusion options")
    assert "| repair | none |" in plain and "repair parameters" not in plain


def test_linear_is_called_a_vanilla_average() -> None:
    config = _config(merge_method="linear", parameters=None, calibration=None, evaluation=None)
    card = render_card(config, library="timm", pipeline_tag=None)
    assert "plain (vanilla) weighted average" in card.text
    assert "optimal transport map" not in card.text and "## Fusion options" not in card.text
    assert "https://arxiv.org/abs/1910.05653" in card.text
    assert "optimal-transport" not in _front_matter(card)["tags"]


def test_yaml_block_reparses_to_the_same_config() -> None:
    for config in (_config(), _config(merge_method="linear", parameters=None, calibration=None)):
        card = render_card(config, library="timm", pipeline_tag=None)
        block = re.search(r"```yaml\n(.*?)```", card.text, re.DOTALL)
        assert block
        assert parse_config(yaml.safe_load(block[1])) == config


def test_evaluation_only_when_rows_are_given() -> None:
    without = render_card(_config(), library="timm", pipeline_tag=None)
    assert "## Evaluation" not in without.text and "accuracy" not in without.text.lower()
    assert "model-index" not in str(without)

    card = render_card(_config(), library="timm", pipeline_tag=None, evaluation=ROWS)
    section = _section(card, "Evaluation")
    assert format_table(ROWS) in section
    for number in ("91.23", "0.3456", "88.77", "10.34", "2.2981", "93.11", "90.46", "0.3321"):
        assert number in section
    assert "ylecun/mnist" in section and "`test`" in section and "1000 samples" in section and "seed 3" in section

    unrecorded = render_card(_config(evaluation=None), library="timm", pipeline_tag=None, evaluation=ROWS[-1:])
    section = _section(unrecorded, "Evaluation")
    assert "does not record" in section and "90.46" in section and "parent 0" not in section


@pytest.mark.parametrize(
    ("library", "repo_id", "auto_class", "snippet"),
    [
        ("timm", "me/fused", None, 'timm.create_model("hf-hub:me/fused", pretrained=True)'),
        ("timm", None, None, 'timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)'),
        ("transformers", "me/fused", None, 'AutoModel.from_pretrained("me/fused")'),
        (
            "transformers",
            None,
            "AutoModelForImageClassification",
            'AutoModelForImageClassification.from_pretrained("PATH/TO/THIS/FOLDER")',
        ),
    ],
)
def test_how_to_use(library: str, repo_id: str | None, auto_class: str | None, snippet: str) -> None:
    card = render_card(_config(), library=library, pipeline_tag=None, repo_id=repo_id, auto_class=auto_class)
    usage = _section(card, "How to use")
    assert snippet in usage
    if library == "transformers":
        assert f"from transformers import {auto_class or 'AutoModel'}\n" in usage


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="library"):
        render_card(_config(), library="keras", pipeline_tag=None)
    with pytest.raises(ValueError, match="auto_class"):
        render_card(_config(), library="timm", pipeline_tag=None, auto_class="AutoModel")
    with pytest.raises(ValueError, match="auto_class"):
        render_card(_config(), library="transformers", pipeline_tag=None, auto_class="AutoModel; import os")
    with pytest.raises(ValueError):
        render_card(_config(), library="timm", pipeline_tag=None, repo_id="not a repo id")


def test_save_and_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_SecretTokenThatMustNeverAppear0123")
    card = render_card(_config(), library="timm", pipeline_tag="image-classification", evaluation=ROWS)
    path = tmp_path / "README.md"
    card.save(path)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("```\n") and not text.endswith("\n\n")
    assert "hf_SecretTokenThatMustNeverAppear0123" not in text
    loaded = ModelCard.load(path)
    assert loaded.data.to_dict() == card.data.to_dict() and loaded.text == card.text


ROOT = Path(__file__).resolve().parents[1]
_BUILD = """\
import json, os, sys, tarfile
from pathlib import Path
from setuptools import build_meta

dist = Path(sys.argv[1])
sdist = dist / build_meta.build_sdist(str(dist))
with tarfile.open(sdist) as tar:
    names = tar.getnames()
    tar.extractall(dist / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
(source,) = (dist / "unpacked").iterdir()
os.chdir(source)  # the wheel is built from the sdist, as pip builds it for a user
wheel = dist / build_meta.build_wheel(str(dist))
print(json.dumps({"sdist": names, "wheel": str(wheel)}))
"""


def test_template_lives_in_the_top_level_model_cards_folder() -> None:
    assert (ROOT / "model_cards" / "otfusion.md").is_file()
    assert not (ROOT / "hf_otfusion" / "model_cards").exists()
    assert TEMPLATE_PATH.resolve() == (ROOT / "model_cards" / "otfusion.md").resolve()  # a source checkout


def test_wheel_ships_the_template_and_renders_from_an_install(tmp_path: Path) -> None:
    """sdist and wheel built as pip builds them for a user; the wheel unpacked (a plain install) renders a card."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("hf_otfusion", "model_cards"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    dist = tmp_path / "dist"
    dist.mkdir()
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(dist)], cwd=tree, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(name.endswith("/model_cards/otfusion.md") for name in built["sdist"]), built["sdist"]
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = wheel.namelist()
        assert "hf_otfusion/model_cards/otfusion.md" in names and "hf_otfusion/py.typed" in names
        assert not [n for n in names if n.startswith("model_cards/")]  # inside the package, not a top-level folder
        assert wheel.read("hf_otfusion/model_cards/otfusion.md") == (ROOT / "model_cards" / "otfusion.md").read_bytes()
        for package in ("hf_otfusion/demo/", "hf_otfusion/trace/"):
            if (ROOT / package / "__init__.py").is_file():
                assert f"{package}__init__.py" in names  # subpackages are still found
        site = tmp_path / "site"
        wheel.extractall(site)

    code = ("import json, hf_otfusion.card as c; from hf_otfusion.config import MergeConfig; "
            "cfg = MergeConfig.model_validate({'models': [{'model': 'org/a'}, {'model': 'org/b'}]}); "
            "card = c.render_card(cfg, library='timm', pipeline_tag=None); "
            "print(json.dumps({'module': c.__file__, 'template': str(c.TEMPLATE_PATH), 'text': card.text}))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["module"]).resolve().is_relative_to(site.resolve())
    assert Path(result["template"]).resolve() == (site / "hf_otfusion" / "model_cards" / "otfusion.md").resolve()
    assert "## Parents" in result["text"] and "[org/a](https://huggingface.co/org/a)" in result["text"]


def test_the_plans_check_and_its_repairs_are_in_the_card() -> None:
    from hf_otfusion.plan import AlignmentPlan, FixedAxes, Verification

    verdict = Verification(verified=True, change=3e-15, dtype="float64", passes=9, repaired=("blocks.0.fc1.weight:0",))
    reason = "failed verification: permuting it changes the output by 0.41 (relative)"
    plan = AlignmentPlan(spaces=(), tensors={"blocks.0.fc1.weight": (8, 4)}, verification=verdict,
                         fixed=(FixedAxes(size=8, members=("blocks.0.fc1.weight:0",), reason=reason),))
    options = _section(render_card(_config(), library="timm", pipeline_tag=None, plan=plan), "Fusion options")
    assert "Plan check: verified" in options and "repaired: 1 spaces" in options and "float64" in options
    assert reason in options and "blocks.0.fc1.weight:0" in options
    unchecked = plan.model_copy(update={"verification": Verification(verified=False, note="meta tensors")})
    options = _section(render_card(_config(), library="timm", pipeline_tag=None, plan=unchecked), "Fusion options")
    assert "Plan check: not verified: meta tensors" in options
