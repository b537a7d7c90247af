"""The lm-eval (lm-evaluation-harness) hand-off: a merged causal LM is scored by ``lm_eval --model hf`` as is.

Two seeded tiny Llamas (byte tokenizer, ``hf_otfusion.testing``) are merged by ``hf-otfusion merge`` (``merge_method:
linear``), and lm-eval's ``hf`` backend scores OUT and a parent offline on a local ``loglikelihood_rolling`` task
(a temporary task YAML, ``dataset_path: json`` over a JSONL file of lines of Python's standard library source). Its
``bits_per_byte`` is checked against the same number computed here with transformers, model by model.
"""

from __future__ import annotations

import inspect
import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from hf_otfusion.cli import app
from hf_otfusion.testing import tiny_llama

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

TASK = "hf_otfusion_stdlib_lines"


def _lines(count: int = 8) -> list[str]:
    """Non-blank lines of ``textwrap``'s source, each short enough for one 64-token window with its prefix token."""
    lines = [line.strip() for line in inspect.getsource(textwrap).splitlines()]
    return [line for line in lines if 20 <= len(line.encode()) <= 60][:count]


def _task_folder(folder: Path, lines: list[str]) -> Path:
    folder.mkdir()
    data = folder / "lines.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    task = {
        "task": TASK,
        "dataset_path": "json",  # datasets' packaged JSON builder: a local file, nothing downloaded
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "cache")},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
        "metadata": {"version": 1.0},
    }
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return folder


def _bits_per_byte(folder: Path, lines: list[str]) -> float:
    """What lm-eval's rolling loglikelihood is for a line that fits one window: every byte token scored after the
    tokenizer's BOS (lm-eval's prefix token), summed over lines, per UTF-8 byte, in bits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for line in lines:
            ids = tokenizer(line, add_special_tokens=False)["input_ids"]
            x = torch.tensor([[tokenizer.bos_token_id, *ids]])
            logp = model(input_ids=x).logits[0, :-1].log_softmax(-1)
            total += logp.gather(1, x[0, 1:, None]).sum().item()
    return -total / sum(len(line.encode()) for line in lines) / math.log(2)


def _lm_eval(folder: Path, tasks: Path) -> dict[str, float]:
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=[TASK],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),  # not its built-in task index
        device="cpu", batch_size=4, bootstrap_iters=0,
        log_samples=False,
    )
    return results["results"][TASK]


def test_lm_eval_scores_the_merged_model_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    a, b = tiny_llama(tmp_path / "a", seed=0), tiny_llama(tmp_path / "b", seed=1)
    config = tmp_path / "linear.yml"
    config.write_text(yaml.safe_dump({"models": [{"model": str(a)}, {"model": str(b)}], "merge_method": "linear"}))
    out = tmp_path / "out"
    merged = CliRunner().invoke(app, ["merge", str(config), str(out), "-q"], catch_exceptions=False)
    assert merged.exit_code == 0, merged.output

    lines = _lines()
    assert len(lines) == 8
    tasks = _task_folder(tmp_path / "tasks", lines)
    scores = {name: _lm_eval(folder, tasks) for name, folder in (("out", out), ("a", a))}
    for name, folder in (("out", out), ("a", a)):
        got = scores[name]
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert math.isfinite(got[f"{metric},none"]), (name, metric, got)
        expected = _bits_per_byte(folder, lines)
        assert got["bits_per_byte,none"] == pytest.approx(expected, rel=1e-4), name
        assert got["byte_perplexity,none"] == pytest.approx(2 ** expected, rel=1e-4), name
    assert scores["out"]["bits_per_byte,none"] != pytest.approx(scores["a"]["bits_per_byte,none"], rel=1e-3)
