"""Streaming fusion from disk to disk: the same tensors as the in-memory path, sharded outputs, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from checkpoints import hf_bert, hf_resnet, hf_vit, timm_resnet
from safetensors.torch import load_file, save_file
from torch import nn

from hf_otfusion import build_plan, fuse
from hf_otfusion.checkpoint import CheckpointError, SafetensorsSource, ShardedWriter
from hf_otfusion.config import parse_config
from hf_otfusion.merge import inspect_parents, merge, plan_stream, streamable
from hf_otfusion.sources import SourceError, inspect_model, load_model
from hf_otfusion.streaming import fuse_checkpoints
from hf_otfusion.testing import cifar_resnet18, seeded

ROOT = Path(__file__).resolve().parents[1]


def _config(models: list[Path], **params) -> object:
    return parse_config({"merge_method": "otfusion", "models": [{"model": str(m)} for m in models],
                         "parameters": {"alignment": "weights", **params}})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# hf-vit: transformers 5 saves ViT under legacy tensor names and renames them while loading; the streamed merge
# reads them through those renamings and writes the legacy names, as save_pretrained does
@pytest.mark.parametrize("make", [timm_resnet, hf_resnet, hf_bert, hf_vit],
                         ids=["timm-resnet", "hf-resnet", "hf-bert", "hf-vit"])
def test_streamed_merge_equals_the_in_memory_merge(tmp_path, make):
    parents = [make(tmp_path / f"m{seed}", seed=seed) for seed in (0, 1)]
    config = _config(parents, residual="mean")
    streamed = merge(config, tmp_path / "streamed", progress=False)
    loaded = merge(config, tmp_path / "loaded", progress=False, stream=False)
    assert streamed.streamed and not loaded.streamed
    a, b = _weights(tmp_path / "streamed"), _weights(tmp_path / "loaded")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == \
        json.loads((tmp_path / "loaded" / "config.json").read_text())
    assert load_model(tmp_path / "streamed").model is not None  # loads with its own library


def test_streamed_bfloat16_output_equals_the_in_memory_one(tmp_path):
    parents = [hf_bert(tmp_path / f"m{seed}", seed=seed) for seed in (0, 1)]
    config = parse_config({"merge_method": "otfusion", "dtype": "bfloat16",
                           "models": [{"model": str(m)} for m in parents]})
    merge(config, tmp_path / "streamed", progress=False)
    merge(config, tmp_path / "loaded", progress=False, stream=False)
    a, b = _weights(tmp_path / "streamed"), _weights(tmp_path / "loaded")
    assert {t.dtype for t in a.values() if t.is_floating_point()} == {torch.bfloat16}
    assert all(torch.equal(a[k], b[k]) for k in a)
    config_json = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config_json == json.loads((tmp_path / "loaded" / "config.json").read_text())
    assert config_json["dtype"] == "bfloat16"


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "loaded"])
def test_out_shard_size_writes_shards_transformers_loads(tmp_path, stream):
    parents = [hf_bert(tmp_path / f"m{seed}", seed=seed) for seed in (0, 1)]
    merge(_config(parents), tmp_path / "one", progress=False)
    merge(_config(parents), tmp_path / "sharded", progress=False, out_shard_size="20KB", stream=stream)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    one, sharded = load_model(tmp_path / "one").model, load_model(tmp_path / "sharded").model
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(one(input_ids=ids).logits, sharded(input_ids=ids).logits)


def test_out_shard_size_is_refused_for_timm_before_anything_runs(tmp_path):
    parents = [timm_resnet(tmp_path / f"m{seed}", seed=seed) for seed in (0, 1)]
    with pytest.raises(SourceError, match="--out-shard-size .* timm loads its weights from one model.safetensors"):
        merge(_config(parents), tmp_path / "out", progress=False, out_shard_size="1MB")
    assert not (tmp_path / "out").exists()


def test_bad_shard_size_names_it(tmp_path):
    parents = [timm_resnet(tmp_path / f"m{seed}", seed=seed) for seed in (0, 1)]
    with pytest.raises(CheckpointError, match="lots"):
        merge(_config(parents), tmp_path / "out", progress=False, out_shard_size="lots")


def test_a_linear_merge_streams_the_loaded_merges_tensors_bit_for_bit(tmp_path):
    parents = [timm_resnet(tmp_path / f"m{seed}", seed=seed) for seed in (0, 1)]
    entries = [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(parents, (1.0, 3.0), strict=True)]
    for dtype in ("float32", "bfloat16"):
        linear = parse_config({"merge_method": "linear", "models": entries, "dtype": dtype})
        assert merge(linear, tmp_path / f"s{dtype}", progress=False).streamed
        assert not merge(linear, tmp_path / f"l{dtype}", progress=False, stream=False).streamed
        streamed, loaded = (load_file(tmp_path / f"{k}{dtype}" / "model.safetensors") for k in "sl")
        assert streamed.keys() == loaded.keys()
        for name, tensor in loaded.items():
            assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor), name
        model = timm.create_model(f"local-dir:{tmp_path / f's{dtype}'}", pretrained=True)
        assert model.fc.weight.dtype == torch.float32  # timm loads it as its own model


def test_merges_that_need_the_models_are_not_streamed(tmp_path):
    parents = [timm_resnet(tmp_path / f"m{seed}", seed=seed) for seed in (0, 1)]
    evaluated = parse_config({"merge_method": "linear", "models": [{"model": str(m)} for m in parents],
                              "evaluation": {"dataset": "x"}})
    assert streamable(evaluated, [inspect_model(str(m)) for m in parents]) is not None


def test_renamed_checkpoint_falls_back_to_loading(tmp_path):
    parents = [timm_resnet(tmp_path / f"m{seed}", seed=seed) for seed in (0, 1)]
    state = load_file(parents[1] / "model.safetensors")
    state["extra.weight"] = torch.zeros(3)
    save_file(state, parents[1] / "model.safetensors", metadata={"format": "pt"})
    config = _config(parents)
    assert plan_stream(config, inspect_parents(config, progress=False)) is None


# ----------------------------------------------------------------------------------------------------------
# fuse_checkpoints: the engine on files, with a plan


def _mlp(width: int, depth: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(width if i else 32, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _save(model: nn.Module, folder: Path) -> Path:
    state = model.state_dict()
    with ShardedWriter(folder, [(k, tuple(v.shape), v.dtype) for k, v in state.items()]) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
    return folder


@pytest.mark.parametrize("residual", ["shared", "mean"])
def test_fuse_checkpoints_equals_fuse(tmp_path, residual):
    models = [seeded(cifar_resnet18, seed, use_norm=True, width=8).eval() for seed in (0, 1)]
    x = torch.randn(2, 3, 32, 32)
    plan = build_plan(models[0], x)
    files = fuse_checkpoints([_save(m, tmp_path / f"m{i}") for i, m in enumerate(models)], tmp_path / "out", plan,
                             residual=residual, progress=False)
    assert [f.name for f in files] == ["model.safetensors"]
    fused = fuse(models, example_input=x, residual=residual, progress=False).state_dict()
    streamed = load_file(files[0])
    assert streamed.keys() == fused.keys()
    assert all(torch.equal(streamed[k], fused[k]) for k in fused)


def test_fuse_checkpoints_takes_the_options_object_and_overrides(tmp_path):
    from hf_otfusion.config import FusionParameters
    from hf_otfusion.errors import FusionError

    models = [_mlp(16, 2), _mlp(16, 2, seed=1)]
    x = torch.randn(2, 32)
    plan = build_plan(models[0], x)
    folders = [_save(m, tmp_path / f"m{i}") for i, m in enumerate(models)]
    options = FusionParameters(solver="sinkhorn", reg=0.1)
    by_object = load_file(fuse_checkpoints(folders, tmp_path / "a", plan, options=options, progress=False)[0])
    by_name = load_file(fuse_checkpoints(folders, tmp_path / "b", plan, solver="sinkhorn", reg=0.1,
                                         progress=False)[0])
    over = load_file(fuse_checkpoints(folders, tmp_path / "c", plan, options=options, reg=0.5, progress=False)[0])
    fused = fuse(models, options, example_input=x, progress=False).state_dict()
    assert all(torch.equal(by_object[k], fused[k]) and torch.equal(by_name[k], fused[k]) for k in fused)
    assert not all(torch.equal(over[k], fused[k]) for k in fused)  # the override wins over the object's reg
    with pytest.raises(FusionError, match="repair 'reset_bn' needs the fused model in memory"):
        fuse_checkpoints(folders, tmp_path / "d", plan, repair="reset_bn", progress=False)
    with pytest.raises(FusionError, match="unknown option 'solvr'"):
        fuse_checkpoints(folders, tmp_path / "e", plan, solvr="emd", progress=False)
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


def test_fuse_checkpoints_fuses_other_widths(tmp_path):
    models = [_mlp(16, 2), _mlp(24, 2, seed=1)]  # the wider one is brought down to the target's widths
    x = torch.randn(2, 32)
    plans = [build_plan(m, x) for m in models]
    files = fuse_checkpoints([_save(m, tmp_path / f"m{i}") for i, m in enumerate(models)], tmp_path / "out",
                             plans[0], plans=plans, progress=False)
    fused = fuse(models, example_input=x, progress=False).state_dict()
    streamed = load_file(files[0])
    assert streamed["0.weight"].shape == (16, 32)
    assert all(torch.equal(streamed[k], fused[k]) for k in fused)


def test_fuse_checkpoints_rejects_a_checkpoint_that_does_not_fit_the_plan(tmp_path):
    a, b = _mlp(16, 2), _mlp(16, 2, seed=1)
    plan = build_plan(a, torch.randn(2, 32))
    _save(a, tmp_path / "a")
    _save(_mlp(8, 2), tmp_path / "narrow")
    _save(nn.Sequential(b, nn.Linear(10, 2)), tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"checkpoint 1: tensor '0.weight' has shape \(8, 32\), its plan says"):
        fuse_checkpoints([tmp_path / "a", tmp_path / "narrow"], tmp_path / "out", plan, progress=False)
    with pytest.raises(CheckpointError, match="checkpoint 1 has a tensor the plan does not know: '0.0.bias'"):
        fuse_checkpoints([tmp_path / "a", tmp_path / "other"], tmp_path / "out", plan, progress=False)


# ----------------------------------------------------------------------------------------------------------
# Memory: two checkpoints several times the process's memory cap


HEADROOM_MB = 320  # what the fusion may allocate on top of Python, torch and the imports (RLIMIT_DATA)
WIDTH, DEPTH = 2048, 48  # 16 MiB per weight: about 800 MB per model, 1.6 GB for the pair


@pytest.mark.parametrize("alignment", ["weights", "activations"])
def test_fusion_of_checkpoints_larger_than_the_memory_cap(tmp_path, alignment):
    """A permuted copy of an ~800 MB MLP fused with the original while the process may allocate 320 MB more than
    its imports took (the pair is 5x that, the output 2.5x): the result is the original, tensor for tensor. In
    activations mode the two graphs run layer by layer on weights read from disk, and the 48 cost matrices go to
    files; the architecture's parameters get memory that is never written, before the cap."""
    script = textwrap.dedent(f"""
        import ctypes, gc, re, resource, sys
        import torch
        from torch import nn
        from hf_otfusion import build_plan
        from hf_otfusion.sources import unwritten_parameters
        from hf_otfusion.streaming import fuse_checkpoints
        import ot, scipy.optimize  # the solvers' imports, before the cap
        torch.set_num_threads(2)
        torch.cdist(torch.randn(512, 512), torch.randn(512, 512)).sum()  # start the thread pool before the cap

        with torch.device("meta"):  # the architecture only
            layers = []
            for i in range({DEPTH}):
                layers += [nn.Linear({WIDTH}, {WIDTH}), nn.ReLU()]
            mlp = nn.Sequential(*layers, nn.Linear({WIDTH}, 10))
        plan = build_plan(mlp, torch.empty(2, {WIDTH}, device="meta"))
        assert len(plan.spaces) == {DEPTH}, plan
        activations = "{alignment}" == "activations"
        if activations:
            unwritten_parameters(mlp)  # address space, not memory: no page of it is ever written
            # large inputs: activations shrink by about 2 ** -0.5 a layer, and the biases must not drown them out
            calibration = 1e4 * torch.randn(128, {WIDTH}, generator=torch.Generator().manual_seed(0))
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the baseline is what is really held
        status = open("/proc/self/status").read()
        base = int(re.search(r"VmData:\\s+(\\d+) kB", status).group(1)) * 1024
        cap = base + {HEADROOM_MB} * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
        try:
            torch.empty({2 * HEADROOM_MB} * 2**20, dtype=torch.uint8).fill_(1)  # the cap binds
            sys.exit("the memory cap is not enforced")
        except (RuntimeError, MemoryError):
            pass
        if activations:
            fuse_checkpoints([sys.argv[1], sys.argv[2]], sys.argv[3], model=mlp, calibration=calibration,
                             progress=False)
        else:
            fuse_checkpoints([sys.argv[1], sys.argv[2]], sys.argv[3], plan, progress=False)
        unwritten = sum(p.numel() * 4 for p in mlp.parameters()) if activations else 0  # in the cap, never used
        print(f"cap {{(cap - unwritten) / 2**20:.0f}} MB")
    """)
    a, b = tmp_path / "a", tmp_path / "b"
    _write_permuted_mlp_pair(a, b)
    size = sum(f.stat().st_size for f in [*a.iterdir(), *b.iterdir()])
    assert size > 4 * HEADROOM_MB * 2**20
    # glibc may keep freed blocks of up to 32 MB in its heap instead of unmapping them: the cap would then count
    # memory that is free, not what the fusion holds
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    proc = subprocess.run([sys.executable, "-c", script, str(a), str(b), str(tmp_path / "out")], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert size > 1.5 * float(proc.stdout.split()[1]) * 2**20  # the pair alone is well over the whole cap
    with SafetensorsSource(a) as original, SafetensorsSource(tmp_path / "out") as fused:
        assert fused.keys() == original.keys()
        bad = [name for name in original if not torch.allclose(fused.get(name), original.get(name), atol=1e-6)]
        assert not bad, bad


def _write_permuted_mlp_pair(a: Path, b: Path) -> None:
    """A random MLP and a copy with every hidden layer permuted, written one tensor at a time."""
    gen = torch.Generator().manual_seed(0)
    names = [f"{2 * i}.{p}" for i in range(DEPTH + 1) for p in ("weight", "bias")]
    shapes = {}
    for i in range(DEPTH + 1):
        rows = 10 if i == DEPTH else WIDTH
        shapes[f"{2 * i}.weight"], shapes[f"{2 * i}.bias"] = (rows, WIDTH), (rows,)
    layout = [(n, shapes[n], torch.float32) for n in names]
    with ShardedWriter(a, layout) as wa, ShardedWriter(b, layout) as wb:
        previous = torch.arange(WIDTH)  # the input is not permuted
        for i in range(DEPTH + 1):
            weight = torch.randn(shapes[f"{2 * i}.weight"], generator=gen) / WIDTH**0.5
            bias = torch.randn(shapes[f"{2 * i}.bias"], generator=gen) * 0.1
            perm = torch.randperm(WIDTH, generator=gen) if i < DEPTH else torch.arange(10)
            wa.write(f"{2 * i}.weight", weight)
            wa.write(f"{2 * i}.bias", bias)
            wb.write(f"{2 * i}.weight", weight[perm][:, previous])
            wb.write(f"{2 * i}.bias", bias[perm])
            previous = perm


def test_a_causal_lm_saved_with_its_default_config_streams_like_the_loaded_merge(tmp_path):
    """Meta-device tracing of a grouped-query Llama (key/value cache on in its config), streamed from disk."""
    from transformers import AutoModelForCausalLM

    from hf_otfusion import merge
    from hf_otfusion.config import parse_config
    from hf_otfusion.testing import tiny_llama

    parents = [tiny_llama(tmp_path / f"lm{s}", seed=s, kv_heads=2) for s in (0, 1)]
    config = parse_config({"models": [{"model": str(p)} for p in parents]})
    streamed = merge(config, tmp_path / "streamed", progress=False)
    loaded = merge(config, tmp_path / "loaded", progress=False, stream=False)
    assert streamed.streamed and not loaded.streamed
    assert any(s.heads == 2 and s.head_group for s in streamed.plan.spaces)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "loaded").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("residual", ["shared", "mean"])
def test_an_activations_merge_streams_layer_by_layer_like_the_loaded_merge(tmp_path, residual):
    """Activations alignment from disk: the parents' graphs run on weights read as each node needs them (hollow
    builds: no weights in memory), and the streamed output equals the in-memory merge's."""
    from transformers import AutoModelForCausalLM

    from hf_otfusion.testing import stdlib_text_dataset, tiny_llama

    data = stdlib_text_dataset(tmp_path / "text", length=24, num_train=70, num_test=8)
    parents = [tiny_llama(tmp_path / f"lm{s}", seed=s, layers=2, kv_heads=2) for s in (0, 1)]
    config = parse_config({"models": [{"model": str(p)} for p in parents],
                           "parameters": {"alignment": "activations", "residual": residual, "repair": "none"},
                           "calibration": {"dataset": str(data), "split": "train", "batch_size": 32}})
    streamed = merge(config, tmp_path / "streamed", progress=False)
    loaded = merge(config, tmp_path / "loaded", progress=False, stream=False)
    assert streamed.streamed and not loaded.streamed
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "loaded").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    vanilla = {k: (load_file(parents[0] / "model.safetensors")[k] + load_file(parents[1] / "model.safetensors")[k]) / 2
               for k in load_file(parents[0] / "model.safetensors")}
    moved = [k for k in vanilla if k in a and not torch.allclose(a[k], vanilla[k])]
    assert len(moved) > len(vanilla) // 2, moved  # the calibration did align channels


def test_the_merge_command_says_the_calibration_streamed(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from hf_otfusion.cli import app
    from hf_otfusion.testing import stdlib_text_dataset, tiny_llama

    data = stdlib_text_dataset(tmp_path / "text", length=24, num_train=40, num_test=8)
    parents = [tiny_llama(tmp_path / f"lm{s}", seed=s, kv_heads=2) for s in (0, 1)]
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump({
        "models": [{"model": str(p)} for p in parents], "parameters": {"alignment": "activations", "repair": "none"},
        "calibration": {"dataset": str(data), "split": "train", "batch_size": 20}}))
    result = CliRunner().invoke(app, ["merge", str(config), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "streamed: each parent's tensors were read from disk as needed; the calibration ran layer by layer" \
        in result.output
    assert not list(tmp_path.glob(".otfusion-costs-*"))  # the spilled costs are gone


def test_a_timm_activations_merge_streams_like_the_loaded_merge(tmp_path):
    """The bundled timm example, activations alignment from disk (BatchNorm statistics read as buffers)."""
    examples = ROOT / "examples"
    config = parse_config({
        "models": [{"model": str(examples / "models" / f"mnist-resnet-seed{s}")} for s in (0, 1)],
        "parameters": {"alignment": "activations", "repair": "none"},
        "calibration": {"dataset": str(examples / "data" / "mnist"), "num_samples": 100, "batch_size": 50}})
    streamed = merge(config, tmp_path / "streamed", progress=False)
    loaded = merge(config, tmp_path / "loaded", progress=False, stream=False)
    assert streamed.streamed and not loaded.streamed
    a, b = _weights(tmp_path / "streamed"), _weights(tmp_path / "loaded")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    original = _weights(examples / "models" / "mnist-resnet-seed0")
    assert not torch.equal(a["conv1.0.weight"], (original["conv1.0.weight"] + _weights(
        examples / "models" / "mnist-resnet-seed1")["conv1.0.weight"]) / 2)  # aligned, not the plain average
