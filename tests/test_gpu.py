"""Fusion on a CUDA device gives what it gives on the CPU (skipped without a GPU; run them on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from hf_otfusion import build_plan, fuse, fuse_checkpoints
from hf_otfusion.checkpoint import ShardedWriter
from hf_otfusion.testing import cifar_resnet18, seeded

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pair() -> list[torch.nn.Module]:
    return [seeded(cifar_resnet18, seed, use_norm=True, width=16).eval() for seed in (0, 1)]


@pytest.mark.parametrize(("alignment", "solver"), [("weights", "emd"), ("weights", "sinkhorn"),
                                                   ("activations", "emd")])
def test_cuda_fusion_matches_the_cpu(alignment, solver):
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = {"calibration": x} if alignment == "activations" else {"example_input": x[:2]}
    cpu = fuse(_pair(), alignment=alignment, solver=solver, device="cpu", progress=False, **kwargs)
    gpu = fuse(_pair(), alignment=alignment, solver=solver, device="cuda", progress=False, **kwargs)
    assert next(gpu.parameters()).device.type == "cpu"  # the models' device: the result is a copy of the target
    with torch.no_grad():
        assert torch.allclose(cpu(x), gpu(x), atol=1e-3, rtol=1e-3)


def test_cuda_streamed_fusion_matches_the_cpu(tmp_path):
    models = _pair()
    folders = []
    for i, model in enumerate(models):
        state = model.state_dict()
        with ShardedWriter(tmp_path / f"m{i}", [(k, tuple(v.shape), v.dtype) for k, v in state.items()]) as w:
            for k, v in state.items():
                w.write(k, v)
        folders.append(tmp_path / f"m{i}")
    plan = build_plan(models[0], torch.randn(2, 3, 32, 32))
    from safetensors.torch import load_file

    cpu = load_file(fuse_checkpoints(folders, tmp_path / "cpu", plan, progress=False)[0])
    gpu = load_file(fuse_checkpoints(folders, tmp_path / "gpu", plan, device="cuda", progress=False)[0])
    assert all(torch.allclose(cpu[k].float(), gpu[k].float(), atol=1e-5) for k in cpu)
