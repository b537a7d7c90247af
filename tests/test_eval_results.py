"""The merged model's evaluation as Hub ``.eval_results`` files: only its own rows, only for Hub datasets."""

from __future__ import annotations

import yaml
from huggingface_hub import parse_eval_result_entries

from hf_otfusion.config import parse_config
from hf_otfusion.eval_results import eval_result_files
from hf_otfusion.evaluate import EvalRow

ROWS = [EvalRow("a", "parent", 0.9, 0.3), EvalRow("b", "parent", 0.8, 0.5), EvalRow("vanilla", "vanilla", 0.1, 2.3),
        EvalRow("ensemble", "ensemble", 0.95, 0.2), EvalRow("OT fusion", "fused", 0.9125, 0.25)]


def _config(dataset: str, **fields) -> object:
    return parse_config({"models": [{"model": "org/a"}, {"model": "org/b"}],
                         "evaluation": {"dataset": dataset, "split": "test", **fields}})


def test_the_merged_models_accuracy_and_loss_for_a_hub_dataset():
    files = eval_result_files(_config("ylecun/mnist", num_samples=1000), ROWS)
    assert sorted(files) == [".eval_results/mnist_accuracy.yaml", ".eval_results/mnist_loss.yaml"]
    accuracy, = parse_eval_result_entries(yaml.safe_load(files[".eval_results/mnist_accuracy.yaml"]))
    assert accuracy.dataset_id == "ylecun/mnist" and accuracy.task_id == "default" and accuracy.value == 91.25
    assert "split 'test', 1000 samples" in accuracy.notes
    loss, = parse_eval_result_entries(yaml.safe_load(files[".eval_results/mnist_loss.yaml"]))
    assert loss.value == 0.25  # the fused row's, not a parent's or the ensemble's


def test_nothing_for_a_local_dataset_or_no_evaluation(tmp_path):
    assert eval_result_files(_config(str(tmp_path)), ROWS) == {}
    assert eval_result_files(_config("mnist"), ROWS) == {}  # not an org/name Hub id
    assert eval_result_files(_config("ylecun/mnist"), None) == {}
