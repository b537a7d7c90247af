"""``hf-otfusion merge`` and ``plan`` end to end: outputs load with their library, errors leave OUT untouched."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from checkpoints import hf_resnet, hf_vit, timm_resnet, timm_vgg_like
from hub_server import DUMMY_TOKEN, HubServer
from huggingface_hub import ModelCard
from transformers import AutoModelForImageClassification
from typer.testing import CliRunner

from hf_otfusion import AlignmentPlan, fuse, vanilla_average
from hf_otfusion.cli import app
from hf_otfusion.config import load_config
from hf_otfusion.sources import example_input, load_model

runner = CliRunner()


def _config(path: Path, models: list[str], **fields) -> Path:
    data = {"models": [{"model": m} for m in models], **fields}
    path.write_text(yaml.safe_dump(data))
    return path


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _outputs(folder: Path, library: str, x: torch.Tensor) -> torch.Tensor:
    if library == "timm":
        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(x)
    return AutoModelForImageClassification.from_pretrained(folder).eval()(x).logits


@pytest.fixture
def timm_pair(tmp_path) -> list[str]:
    return [str(timm_resnet(tmp_path / "a", seed=0)), str(timm_resnet(tmp_path / "b", seed=1))]


@pytest.mark.parametrize(
    ("make", "library"),
    [(timm_resnet, "timm"), (hf_resnet, "transformers"), (hf_vit, "transformers")],
    ids=["timm-resnet", "hf-resnet", "hf-vit"],
)
def test_merge_writes_a_loadable_fused_model(tmp_path, make, library):
    parents = [str(make(tmp_path / "a", seed=0)), str(make(tmp_path / "b", seed=1))]
    config = _config(tmp_path / "c.yml", parents, base_model=parents[1])
    config_text = config.read_text()
    out = tmp_path / "out"
    result = _invoke("merge", config, out, "--quiet")
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "hf_otfusion.yml", "plan.json", "README.md"} <= names
    if library == "transformers":
        assert "preprocessor_config.json" in names
    assert config.read_text() == config_text
    assert load_config(out / "hf_otfusion.yml") == load_config(config)
    plan = AlignmentPlan.from_json((out / "plan.json").read_text())

    loaded = [load_model(p) for p in parents]
    x = example_input(loaded[0])
    expected = fuse([m.model for m in loaded], target=1, example_input=x, plan=plan, progress=False)
    got = _outputs(out, library, x)
    want = getattr(expected(x), "logits", expected(x))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    card = ModelCard.load(out / "README.md").data.to_dict()
    assert card["library_name"] == library and card["pipeline_tag"] == "image-classification"
    assert {"hf-otfusion", "merge", "optimal-transport", library} <= set(card["tags"])
    assert "base_model" not in card  # local parents cannot be named as Hub base models


def test_linear_merge_is_the_vanilla_average(tmp_path, timm_pair):
    out = tmp_path / "out"
    result = _invoke("merge", _config(tmp_path / "c.yml", timm_pair, merge_method="linear"), out, "-q")
    assert result.exit_code == 0, result.output
    assert not (out / "plan.json").exists()
    loaded = [load_model(p) for p in timm_pair]
    x = example_input(loaded[0])
    torch.testing.assert_close(_outputs(out, "timm", x), vanilla_average([m.model for m in loaded])(x))


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, timm_pair):
    out = tmp_path / "out"
    result = _invoke("merge", _config(tmp_path / "c.yml", timm_pair), out, "--dry-run", "-q")
    assert result.exit_code == 0, result.output
    assert "AlignmentPlan:" in result.output and "conv1.0.weight:0" in result.output
    assert "nothing was written" in result.output
    assert not out.exists()


def test_plan_command(tmp_path):
    folder = timm_resnet(tmp_path / "m", seed=0)
    table = _invoke("plan", folder, "-q")
    assert table.exit_code == 0 and "AlignmentPlan: 12 spaces" in table.output
    as_json = _invoke("plan", f"local-dir:{folder}", "--json", "-q")
    assert AlignmentPlan.from_json(as_json.output).spaces[0].name == "conv1.0.weight:0"
    maps = _invoke("plan", folder, "--maps", "-q")  # BatchNorm keeps the residual streams to permutations
    assert maps.exit_code == 0 and "permutation only ('layer4.0.bn2.weight' is used by" in maps.output


def test_plan_command_says_which_spaces_take_orthogonal_maps(tmp_path):
    from hf_otfusion.testing import tiny_llama

    result = _invoke("plan", tiny_llama(tmp_path / "llama", seed=0, kv_heads=2), "--maps", "-q")
    assert result.exit_code == 0, result.output
    lines = result.output.split("maps other than permutations")[1].splitlines()[1:]
    assert lines == ["  - model.embed_tokens.weight:1: orthogonal (3 norm gains folded into their readers)",
                     "  - model.layers.0.self_attn.q_proj.weight:0: a rotation per rotary channel pair (half)",
                     "  - model.layers.0.self_attn.v_proj.weight:0: an orthogonal map per head",
                     "  - model.layers.0.mlp.gate_proj.weight:0: a sign per unit (model.layers.0.mlp.up_proj and "
                     "model.layers.0.mlp.down_proj)"]


def _bad_config(tmp_path, pair):
    path = tmp_path / "c.yml"
    path.write_text(f"models:\n  - model: {pair[0]}\n  - model: {pair[1]}\nalignmnt: weights\n")
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("bad-field", "alignmnt: unknown field"),
        ("missing-model", "model folder not found"),
        ("other-architecture", "cannot merge different architectures"),
        ("other-library", "cannot merge a transformers model"),
        ("missing-config", "config file not found"),
        ("not-yaml", "is not valid YAML"),
    ],
)
def test_bad_input_is_one_message_and_leaves_out_untouched(tmp_path, timm_pair, case, message):
    out = tmp_path / "out"  # a previous output, which --overwrite may replace: the bad input still leaves it as it is
    out.mkdir()
    (out / "hf_otfusion.yml").write_text("precious")
    if case == "bad-field":
        config = _bad_config(tmp_path, timm_pair)
    elif case == "missing-model":
        config = _config(tmp_path / "c.yml", [timm_pair[0], str(tmp_path / "nope")])
    elif case == "other-architecture":
        config = _config(tmp_path / "c.yml", [timm_pair[0], str(timm_vgg_like(tmp_path / "v", seed=0))])
    elif case == "other-library":
        config = _config(tmp_path / "c.yml", [timm_pair[0], str(hf_vit(tmp_path / "v", seed=0))])
    elif case == "missing-config":
        config = tmp_path / "absent.yml"
    else:
        config = tmp_path / "c.yml"
        config.write_text("models: [\n")
    result = runner.invoke(app, ["merge", str(config), str(out), "--overwrite", "-q"])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert [p.name for p in out.iterdir()] == ["hf_otfusion.yml"]
    assert (out / "hf_otfusion.yml").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_existing_output_needs_overwrite(tmp_path, timm_pair):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    config = _config(tmp_path / "c.yml", timm_pair)
    refused = runner.invoke(app, ["merge", str(config), str(out), "-q"])
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    assert (out / "keep.txt").read_text() == "precious"
    refused = runner.invoke(app, ["merge", str(config), str(out), "--overwrite", "-q"])
    assert refused.exit_code == 1 and "not an hf-otfusion output" in refused.output and "keep.txt" in refused.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    assert _invoke("merge", config, out, "-q").exit_code == 0
    first = (out / "model.safetensors").stat().st_mtime_ns
    replaced = _invoke("merge", config, out, "--overwrite", "-q")  # a previous output is replaced
    assert replaced.exit_code == 0, replaced.output
    assert (out / "model.safetensors").stat().st_mtime_ns != first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_no_card(tmp_path, timm_pair):
    out = tmp_path / "out"
    assert _invoke("merge", _config(tmp_path / "c.yml", timm_pair), out, "--no-card", "-q").exit_code == 0
    assert not (out / "README.md").exists() and (out / "model.safetensors").is_file()


def test_bad_options(tmp_path, timm_pair):
    config = _config(tmp_path / "c.yml", timm_pair)
    bad_device = runner.invoke(app, ["merge", str(config), str(tmp_path / "o"), "--device", "tpu"])
    assert bad_device.exit_code == 2 and "tpu" in bad_device.output
    private_alone = runner.invoke(app, ["merge", str(config), str(tmp_path / "o"), "--private"])
    assert private_alone.exit_code == 2 and "--push-to-hub" in private_alone.output
    bad_repo = runner.invoke(app, ["merge", str(config), str(tmp_path / "o"), "--push-to-hub", "a b"])
    assert bad_repo.exit_code == 1 and "not a Hub repo id" in bad_repo.output
    if not torch.cuda.is_available():  # mergekit's --cuda is --device cuda
        cuda = runner.invoke(app, ["merge", str(config), str(tmp_path / "o"), "--cuda", "-q"])
        assert cuda.exit_code == 1 and "device='cuda'" in cuda.output and "Traceback" not in cuda.output
    assert not (tmp_path / "o").exists()


def test_hub_round_trip(hub_server: HubServer, tmp_path):
    hub_server.seed_repo("org/parent-a", timm_resnet(tmp_path / "a", seed=0))
    hub_server.seed_repo("org/parent-b", timm_resnet(tmp_path / "b", seed=1))
    config = _config(tmp_path / "c.yml", ["org/parent-a", "hf-hub:org/parent-b@main"])
    out = tmp_path / "out"
    result = _invoke("merge", config, out, "--push-to-hub", "me/fused", "--private")
    assert result.exit_code == 0, result.output
    assert "pushed to" in result.output and DUMMY_TOKEN not in result.output
    assert hub_server.repo("me/fused").private
    assert {"config.json", "model.safetensors", "README.md", "hf_otfusion.yml", "plan.json"} <= set(
        hub_server.list_files("me/fused")
    )
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pulled = timm.create_model("hf-hub:me/fused", pretrained=True).eval()
    torch.testing.assert_close(pulled(x), _outputs(out, "timm", x))
    card = ModelCard.load(out / "README.md").data.to_dict()
    assert card["base_model"] == ["org/parent-a", "org/parent-b"] and card["base_model_relation"] == "merge"
    assert "hf-hub:me/fused" in (out / "README.md").read_text()


def test_card_names_the_commit_each_hub_parent_resolved_to(hub_server: HubServer, tmp_path):
    first = hub_server.seed_repo("org/parent-a", timm_resnet(tmp_path / "a", seed=0))
    hub_server.seed_repo("org/parent-a", {"notes.txt": "a later commit on main"})
    head = hub_server.repo("org/parent-a").head
    branch = hub_server.seed_repo("org/parent-b", timm_resnet(tmp_path / "b", seed=1), revision="v1")
    local = timm_resnet(tmp_path / "c", seed=2)
    config = _config(tmp_path / "c.yml", ["org/parent-a", f"org/parent-a@{first}", "hf-hub:org/parent-b@v1",
                                          str(local)])
    out = tmp_path / "out"
    result = _invoke("merge", config, out, "--quiet")
    assert result.exit_code == 0, result.output
    assert len({head, first, branch}) == 3
    parents = (out / "README.md").read_text().split("\n## Parents\n")[1].split("\n## ")[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in parents.splitlines()
            if re.match(r"^\| \d \|", line)]
    assert [row[2] for row in rows] == ["main", first, "v1", "local"]  # the revision asked for ...
    assert [row[3] for row in rows] == [  # ... and the commit it resolved to
        f"[`{head}`](https://huggingface.co/org/parent-a/tree/{head})",
        f"[`{first}`](https://huggingface.co/org/parent-a/tree/{first})",
        f"[`{branch}`](https://huggingface.co/org/parent-b/tree/{branch})",
        "not on the Hub",
    ]
    assert f"`{local}` (local folder)" in rows[3][1]  # a local parent shows its path


def test_no_push_after_a_failed_merge(hub_server: HubServer, tmp_path):
    hub_server.seed_repo("org/parent-a", timm_resnet(tmp_path / "a", seed=0))
    config = _config(tmp_path / "c.yml", ["org/parent-a", "org/missing"])
    result = runner.invoke(app, ["merge", str(config), str(tmp_path / "out"), "--push-to-hub", "me/fused", "-q"])
    assert result.exit_code == 1 and "'org/missing' not found on the Hub" in result.output
    assert not hub_server.has_repo("me/fused") and hub_server.commit_requests() == []
    assert not (tmp_path / "out").exists()


def test_console_script_reports_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hf_otfusion.cli", "merge", str(tmp_path / "absent.yml"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert "Error: config file not found" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads(json.dumps(proc.stdout)) == ""


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_bundled_example_activations_reset_bn_and_evaluation(tmp_path):
    """The offline MNIST example (real digits): OT fusion + BN reset far above the vanilla average."""
    data = str(EXAMPLES / "data" / "mnist")
    config = _config(
        tmp_path / "c.yml",
        [str(EXAMPLES / "models" / "mnist-resnet-seed0"), str(EXAMPLES / "models" / "mnist-resnet-seed1")],
        parameters={"alignment": "activations", "repair": "reset_bn"},
        calibration={"dataset": data, "split": "train", "num_samples": 300, "batch_size": 100},
        evaluation={"dataset": data, "split": "test", "num_samples": 300, "batch_size": 150},
    )
    out = tmp_path / "out"
    result = _invoke("merge", config, out, "-q")
    assert result.exit_code == 0, result.output
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in result.output.splitlines()
            if line.startswith("| ") and not line.startswith("| model")}
    parents = [v for k, v in rows.items() if "mnist-resnet-seed" in k]
    assert len(parents) == 2 and min(parents) > 95
    assert rows["OT fusion"] > rows["vanilla average"] + 50  # measured: 92.3 vs 17.7
    assert rows["OT fusion"] > sum(parents) / 2 - 8
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and f"| OT fusion | {rows['OT fusion']:.2f} |" in card
    assert ModelCard.load(out / "README.md").data.to_dict()["library_name"] == "timm"


def test_merge_bert_keeps_heads_and_copies_the_tokenizer(tmp_path):
    from checkpoints import hf_bert
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    parents = [str(hf_bert(tmp_path / "a", seed=0)), str(hf_bert(tmp_path / "b", seed=1))]
    out = tmp_path / "out"
    result = _invoke("merge", _config(tmp_path / "c.yml", parents), out, "-q")
    assert result.exit_code == 0, result.output
    plan = AlignmentPlan.from_json((out / "plan.json").read_text())
    assert any(space.heads == 2 for space in plan.spaces)
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["w1 w2 w3", "w4 w5"], padding=True, return_tensors="pt")
    loaded = [load_model(p) for p in parents]
    expected = fuse([m.model for m in loaded], example_input=example_input(loaded[0]), plan=plan, progress=False)
    got = AutoModelForSequenceClassification.from_pretrained(out).eval()(**batch).logits
    torch.testing.assert_close(got, expected.eval()(**batch).logits, rtol=1e-4, atol=1e-5)
    card = ModelCard.load(out / "README.md").data.to_dict()
    assert card["pipeline_tag"] == "text-classification" and card["library_name"] == "transformers"


def test_profile_prints_where_the_time_went(tmp_path, timm_pair):
    config = _config(tmp_path / "c.yml", timm_pair, merge_method="otfusion")
    result = _invoke("merge", config, tmp_path / "out", "--profile")
    assert result.exit_code == 0, result.output
    assert "streamed: each parent's tensors were read from disk" in result.output
    phases = dict(re.findall(r"^\| (\w+) \| ([\d.]+) \|", result.output, flags=re.M))
    assert {"load", "trace", "cost", "solve", "transport", "write"} <= set(phases)
    assert "| slowest spaces | seconds |" in result.output


def test_out_shard_size_options_are_checked(tmp_path, timm_pair):
    config = _config(tmp_path / "c.yml", timm_pair)
    result = _invoke("merge", config, tmp_path / "out", "--out-shard-size", "10MB", "-q")
    assert result.exit_code == 1 and "timm loads its weights from one model.safetensors" in result.output
    result = _invoke("merge", config, tmp_path / "out", "--out-shard-size", "huge", "-q")
    assert result.exit_code == 1 and "huge" in result.output
    assert not (tmp_path / "out").exists()


def _table_losses(output: str) -> dict[str, float]:
    """model name -> loss, from the evaluation table ``merge`` prints."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] not in ("model", "---") and re.fullmatch(r"[\d.]+", cells[1]):
            rows[cells[0]] = float(cells[1])
    return rows


def test_merge_of_two_trained_llama_gqa_checkpoints_reports_perplexity_and_generates(tmp_path):
    """Two grouped-query Llamas trained from different seeds on real text, saved with their default config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_otfusion.config import DatasetConfig
    from hf_otfusion.data import load_split
    from hf_otfusion.testing import stdlib_text_dataset, tiny_llama

    data = stdlib_text_dataset(tmp_path / "text", length=48, num_train=192, num_test=48)
    train = list(load_split(DatasetConfig(dataset=str(data), split="train"))["text"])
    parents = [tiny_llama(tmp_path / f"llama-seed{s}", seed=s, hidden=32, kv_heads=2, train_on=train, steps=150)
               for s in (0, 1)]
    config = _config(tmp_path / "llama.yml", [str(p) for p in parents],
                     parameters={"alignment": "activations"},
                     calibration={"dataset": str(data), "split": "train", "batch_size": 32},
                     evaluation={"dataset": str(data), "split": "test", "batch_size": 16})
    out = tmp_path / "fused"
    result = runner.invoke(app, ["merge", str(config), str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout
    assert "hidden spaces left fixed" in result.stderr and "rotary" in result.stderr  # said, in one line
    losses = _table_losses(result.stdout)
    vanilla = next(v for k, v in losses.items() if "vanilla" in k)
    fused = losses["OT fusion"]
    assert fused < vanilla, losses
    plan = AlignmentPlan.model_validate_json((out / "plan.json").read_text())
    assert any(s.heads == 2 and s.head_group for s in plan.spaces)  # kv heads aligned with their query groups
    card = ModelCard.load(out / "README.md")
    assert "perplexity" in card.text and "left in place" in card.text
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.use_cache and model.config.num_key_value_heads == 2
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("def ", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5


def test_strict_refuses_a_plan_with_movable_channels_left_fixed(tmp_path):
    from hf_otfusion.testing import tiny_llama

    parents = [tiny_llama(tmp_path / f"lm{s}", seed=s, kv_heads=2) for s in (0, 1)]
    config = _config(tmp_path / "c.yml", [str(p) for p in parents])
    # rotary embeddings fix q/k channels inside heads, which no permutation may move: strict accepts that
    assert runner.invoke(app, ["merge", str(config), str(tmp_path / "ok"), "-q", "--strict"]).exit_code == 0
    # Qwen3's q/k norm indexes every head's channels alike, but rotary embeddings fix those channels anyway
    qwen3 = tmp_path / "qwen3"
    from transformers import Qwen3Config, Qwen3ForCausalLM

    Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)).save_pretrained(qwen3)
    assert runner.invoke(app, ["plan", str(qwen3), "--strict", "-q"]).exit_code == 0
    # timm's qk_norm on a ViT without rotary: the channels inside its q/k heads move alike in every head
    vit = tmp_path / "vit_qk_norm"
    args = {"img_size": 16, "patch_size": 8, "depth": 1, "qk_norm": True, "num_classes": 4}
    model = timm.create_model("vit_tiny_patch16_224", **args)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 16, 16), "crop_pct": 1.0}
    timm.models.save_for_hf(model, str(vit), model_args=args, safe_serialization=True)
    assert runner.invoke(app, ["plan", str(vit), "--strict", "-q"]).exit_code == 0
    # Mixtral's experts move as blocks with their router rows: nothing movable is left fixed
    mixtral = tmp_path / "mixtral"
    from transformers import MixtralConfig, MixtralForCausalLM

    MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                     num_experts_per_tok=1)).save_pretrained(mixtral)
    assert runner.invoke(app, ["plan", str(mixtral), "--strict", "-q"]).exit_code == 0
    # DeepSeek-V3's latent attention writes its rotary part with slice_scatter (no tracer rule) and its
    # group-limited router takes an unsorted top-k (not followed): strict refuses it
    deepseek = tmp_path / "deepseek_v3"
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)).save_pretrained(deepseek)
    config = _config(tmp_path / "n.yml", [str(deepseek), str(deepseek)], parameters={"strict": True})
    refused = runner.invoke(app, ["merge", str(config), str(tmp_path / "no"), "-q"])
    assert refused.exit_code == 1 and "strict" in refused.output and "no tracer rule for op" in refused.output
    assert not (tmp_path / "no").exists()
    planned = runner.invoke(app, ["plan", str(deepseek), "--strict", "-q"])
    assert planned.exit_code == 1 and "hidden channels left fixed" in planned.output
