"""Lazy safetensors reading (SafetensorsSource, StateSource) and streamed, sharded writing (ShardedWriter)."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_otfusion.checkpoint import (
    CheckpointError,
    SafetensorsSource,
    ShardedWriter,
    StateSource,
    TensorSource,
    find_checkpoint,
    parse_size,
)
from hf_otfusion.errors import FusionError


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=gen, dtype=dtype)


def _layout(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(name, tuple(t.shape), t.dtype) for name, t in state.items()]


def _write(folder, state: dict[str, torch.Tensor], seed: int = 0, **kwargs) -> ShardedWriter:
    """Write ``state`` with a ShardedWriter, tensors in a shuffled order."""
    order = list(state)
    random.Random(seed).shuffle(order)
    with ShardedWriter(folder, _layout(state), **kwargs) as writer:
        for name in order:
            writer.write(name, state[name])
    return writer


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_round_trip_matches_safetensors(tmp_path, dtype):
    gen = torch.Generator().manual_seed(0)
    state = {
        "a.weight": _random((5, 7), dtype, gen),
        "b.bias": _random((3,), dtype, gen),
        "c.scalar": _random((), dtype, gen),
        "d.empty": _random((0, 4), dtype, gen),
        "e.cube": _random((2, 3, 4), dtype, gen),
    }
    writer = _write(tmp_path, state, seed=1)
    assert writer.files == [tmp_path / "model.safetensors"] and writer.index is None
    _assert_same(load_file(tmp_path / "model.safetensors"), state)
    # One dtype and sorted names is the order safetensors itself lays tensors out in: the files are byte-identical.
    save_file(state, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_mixed_dtypes_in_layout_order(tmp_path):
    """Tensors lie back to back in layout order, a bool before a float32 included (unaligned offsets load fine)."""
    gen = torch.Generator().manual_seed(1)
    state = {
        "mask": _random((3,), torch.bool, gen),
        "w": _random((4, 5), torch.float32, gen),
        "h": _random((7,), torch.bfloat16, gen),
        "step": torch.tensor(12345678901, dtype=torch.int64),
        "none": torch.empty(0, dtype=torch.float16),
        "x": _random((2, 2), torch.float64, gen),
    }
    _write(tmp_path, state, seed=2, metadata={"note": "fused"})
    _assert_same(load_file(tmp_path / "model.safetensors"), state)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "fused"}
        assert f.offset_keys() == list(state)
    with SafetensorsSource(tmp_path) as src:
        assert src.keys() == list(state)
        _assert_same({k: src.get(k) for k in src}, state)


def test_write_accepts_views_and_parameters(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"t": base.t(), "p": torch.nn.Parameter(torch.ones(2, 2)), "s": base[:, 1]}
    _write(tmp_path, state)
    _assert_same(load_file(tmp_path / "model.safetensors"), {k: v.detach().contiguous() for k, v in state.items()})


def _shard_data_size(path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(e - b for k, v in header.items() if k != "__metadata__" for b, e in [v["data_offsets"]])


def test_sharding(tmp_path):
    gen = torch.Generator().manual_seed(2)
    state = {
        f"layer{i}.{kind}": _random((8, 8 if kind == "weight" else 1), torch.float32, gen)
        for i in range(6)
        for kind in ("weight", "bias")
    }
    limit = 600  # a weight is 256 bytes, a bias 32
    writer = _write(tmp_path, state, seed=3, max_shard_size=limit)
    n = len(writer.files)
    assert n >= 3
    assert writer.files == [tmp_path / f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(tmp_path.iterdir()) == sorted([*writer.files, tmp_path / "model.safetensors.index.json"])
    assert all(_shard_data_size(f) <= limit for f in writer.files)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": sum(t.numel() * t.element_size() for t in state.values())}
    loaded = {}
    for file in writer.files:
        shard = load_file(file)
        assert all(index["weight_map"][k] == file.name for k in shard)
        loaded |= shard
    assert set(index["weight_map"]) == set(state)
    _assert_same(loaded, state)

    assert find_checkpoint(tmp_path) == tmp_path / "model.safetensors.index.json"
    with SafetensorsSource(tmp_path) as src:
        assert src.files == writer.files
        assert src.keys() == list(state)  # layout order across shards
        assert src.nbytes() == index["metadata"]["total_size"]
        _assert_same({k: src.get(k) for k in src}, state)


def test_sharding_is_greedy_and_oversize_tensor_gets_own_shard(tmp_path):
    layout = [
        ("a", (10,), torch.float32),
        ("b", (10,), torch.float32),
        ("big", (100,), torch.float32),
        ("c", (10,), torch.float32),
        ("d", (30,), torch.float32),
    ]
    state = {name: torch.full(shape, float(i), dtype=dtype) for i, (name, shape, dtype) in enumerate(layout)}
    writer = _write(tmp_path, state, max_shard_size="100B")  # a..c are 40 bytes, big 400, d 120
    contents = [list(load_file(f)) for f in writer.files]
    assert contents == [["a", "b"], ["big"], ["c"], ["d"]]


def test_max_shard_size_larger_than_model_gives_one_file(tmp_path):
    writer = _write(tmp_path, {"a": torch.ones(4), "b": torch.zeros(3)}, max_shard_size="1MB")
    assert writer.close() == [tmp_path / "model.safetensors"]


def test_loads_with_transformers(tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99
    )
    model = transformers.BertModel(config).eval()
    state = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    writer = _write(tmp_path, state, max_shard_size=total // 4)
    config.save_pretrained(tmp_path)
    assert len(writer.files) >= 3

    loaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    _assert_same(loaded.state_dict(), state)


def test_stale_files_of_an_earlier_save_are_removed(tmp_path):
    state = {f"t{i}": torch.full((50,), float(i)) for i in range(4)}
    (tmp_path / "config.json").write_text("{}")
    sharded = _write(tmp_path, state, max_shard_size=250)
    assert len(sharded.files) == 4
    _write(tmp_path, state)  # now one file: the shards and index must go, or loaders would still prefer the index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    _write(tmp_path, state, max_shard_size=450)
    assert find_checkpoint(tmp_path) == tmp_path / "model.safetensors.index.json"
    assert not (tmp_path / "model.safetensors").exists() and len(list(tmp_path.glob("model-*"))) == 2


def test_prefix(tmp_path):
    writer = _write(tmp_path, {"a": torch.ones(30), "b": torch.ones(30)}, max_shard_size=150, prefix="unet")
    assert [f.name for f in writer.close()] == [
        "unet-00001-of-00002.safetensors",
        "unet-00002-of-00002.safetensors",
        "unet.safetensors.index.json",
    ]
    assert find_checkpoint(tmp_path) is None and find_checkpoint(tmp_path, prefix="unet") == writer.index


def test_unfinished_checkpoint_does_not_load(tmp_path):
    layout = [("a", (4,), torch.float32), ("b", (4,), torch.float32)]
    with pytest.raises(RuntimeError, match="boom"), ShardedWriter(tmp_path, layout) as writer:
        writer.write("a", torch.ones(4))
        raise RuntimeError("boom")
    with pytest.raises(CheckpointError, match="was closed unfinished"):
        writer.close()
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        SafetensorsSource(tmp_path)


# --- writer errors ---------------------------------------------------------------------------------------------------

LAYOUT = [("w", (2, 3), torch.float32), ("b", (3,), torch.bfloat16)]


def _unknown(w):
    w.write("x", torch.ones(2, 3))


def _wrong_shape(w):
    w.write("w", torch.ones(3, 2))


def _wrong_dtype(w):
    w.write("b", torch.ones(3))


def _twice(w):
    w.write("w", torch.ones(2, 3))
    w.write("w", torch.ones(2, 3))


def _not_a_tensor(w):
    w.write("w", [[1.0] * 3] * 2)


def _meta(w):
    w.write("w", torch.empty(2, 3, device="meta"))


def _missing_at_close(w):
    w.write("w", torch.ones(2, 3))
    w.close()


def _after_close(w):
    w.write("w", torch.ones(2, 3))
    w.write("b", torch.ones(3, dtype=torch.bfloat16))
    w.close()
    w.write("b", torch.ones(3, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (_unknown, r"no tensor 'x' in the layout of .*"),
        (_wrong_shape, r"tensor 'w' is \(3, 2\) torch.float32, but the layout says \(2, 3\) torch.float32"),
        (_wrong_dtype, r"tensor 'b' is \(3,\) torch.float32, but the layout says \(3,\) torch.bfloat16"),
        (_twice, r"tensor 'w' was already written to"),
        (_not_a_tensor, r"tensor 'w' is a list, not a torch.Tensor"),
        (_meta, r"tensor 'w' has no dense data to write \(torch.strided, meta\)"),
        (_missing_at_close, r"1 tensor\(s\) never written to .*: 'b'"),
        (_after_close, r"cannot write tensor 'b': the writer for .* is closed"),
    ],
    ids=[
        "unknown-name",
        "wrong-shape",
        "wrong-dtype",
        "written-twice",
        "not-a-tensor",
        "meta",
        "missing-at-close",
        "closed",
    ],
)
def test_writer_errors(tmp_path, action, message):
    with pytest.raises(CheckpointError, match=message) as info, ShardedWriter(tmp_path, LAYOUT) as writer:
        action(writer)
    assert isinstance(info.value, FusionError)


def test_unknown_name_suggests_the_closest(tmp_path):
    with ShardedWriter(tmp_path, [("encoder.weight", (1,), torch.float32)]) as writer:
        with pytest.raises(CheckpointError, match=r"did you mean 'encoder.weight'\?"):
            writer.write("encoder.weigth", torch.ones(1))
        writer.write("encoder.weight", torch.ones(1))


@pytest.mark.parametrize(
    ("layout", "kwargs", "message"),
    [
        ([("a", (1,), torch.float32), ("a", (2,), torch.float32)], {}, "tensor 'a' appears twice in the layout"),
        ([("__metadata__", (1,), torch.float32)], {}, "'__metadata__' cannot be a tensor name"),
        ([("a", (1,), torch.quint8)], {}, "tensor 'a' has dtype torch.quint8, which safetensors cannot store"),
        ([("a", (-1,), torch.float32)], {}, r"tensor 'a' has a negative dimension in shape \(-1,\)"),
        ([("a", (1,), torch.float32)], {"max_shard_size": "lots"}, "cannot read size 'lots'"),
        (
            [("a", (1,), torch.float32)],
            {"metadata": {"epoch": 3}},
            r"metadata must map str to str; not so for \['epoch'\]",
        ),
    ],
    ids=["duplicate", "reserved-name", "bad-dtype", "negative-dim", "bad-size", "bad-metadata"],
)
def test_bad_layouts(tmp_path, layout, kwargs, message):
    with pytest.raises(CheckpointError, match=message):
        ShardedWriter(tmp_path, layout, **kwargs)
    assert not list(tmp_path.iterdir())


# --- reading ---------------------------------------------------------------------------------------------------------


def test_state_source():
    state = {"b": torch.ones(2, 3), "a": torch.zeros(4, dtype=torch.bfloat16)}
    src = StateSource(state)
    assert isinstance(src, TensorSource)
    assert src.keys() == ["b", "a"] and len(src) == 2 and "a" in src and "c" not in src
    assert src.shape("b") == (2, 3) and src.dtype("a") == torch.bfloat16
    assert src.get("b") is state["b"]
    assert src.nbytes() == 6 * 4 + 4 * 2
    with pytest.raises(CheckpointError, match=r"no tensor 'bb' in the state dict \(did you mean 'b'\?\)"):
        src.get("bb")
    with pytest.raises(CheckpointError, match="no tensor 'zzz' in the state dict$"):
        src.shape("zzz")


def test_safetensors_source_reads_headers_only(tmp_path, monkeypatch):
    state = {"w": torch.randn(64, 32), "h": torch.ones(5, dtype=torch.bfloat16), "i": torch.arange(3)}
    save_file(state, tmp_path / "one.safetensors")
    # Cut the data buffer off: names, shapes, dtypes and sizes still come out, because only the header is read.
    data = (tmp_path / "one.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    (tmp_path / "cut.safetensors").write_bytes(data[: 8 + n])
    with SafetensorsSource(tmp_path / "cut.safetensors") as src:
        assert isinstance(src, TensorSource)
        assert set(src.keys()) == set(state) and len(src) == 3
        assert {k: (src.shape(k), src.dtype(k)) for k in state} == {
            k: (tuple(t.shape), t.dtype) for k, t in state.items()
        }
        assert src.nbytes() == 64 * 32 * 4 + 5 * 2 + 3 * 8
        assert src.files == [tmp_path / "cut.safetensors"]
        with pytest.raises(CheckpointError, match=r"cut.safetensors is truncated: tensor 'w' needs 8192 bytes, 0 were"):
            src.get("w")
    with SafetensorsSource(tmp_path / "one.safetensors") as src:
        _assert_same({k: src.get(k) for k in state}, state)
        assert src.metadata() == {}
        with pytest.raises(CheckpointError, match=r"no tensor 'x' in .*one.safetensors"):
            src.dtype("x")


def test_safetensors_source_keeps_shards_open_until_close(tmp_path):
    state = {"a": torch.ones(40), "b": torch.zeros(40)}
    _write(tmp_path, state, max_shard_size=160)
    src = SafetensorsSource(tmp_path)
    a = src.get("a")
    assert len(src._open) == 1
    src.get("b")
    assert len(src._open) == 2
    src.close()
    assert not src._open and torch.equal(a, torch.ones(40))  # a tensor outlives its memory map
    a.mul_(2)  # and is the caller's own: changing it leaves the file alone
    assert torch.equal(src.get("a"), torch.ones(40))
    assert torch.equal(src.get("b"), torch.zeros(40))  # reopens on demand
    src.close()


def _folder_without_checkpoint(folder):
    (folder / "config.json").write_text("{}")
    return folder


def _missing_file(folder):
    return folder / "nope.safetensors"


def _missing_shard(folder):
    _write(folder, {"a": torch.ones(40), "b": torch.zeros(40)}, max_shard_size=160)
    (folder / "model-00002-of-00002.safetensors").unlink()
    return folder


def _bad_index(folder):
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return folder


def _index_lies(folder):
    _write(folder, {"a": torch.ones(40), "b": torch.zeros(40)}, max_shard_size=160)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["c"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _corrupt_header(folder):
    save_file({"a": torch.ones(3)}, folder / "model.safetensors")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:10] = b"#!"
    (folder / "model.safetensors").write_bytes(bytes(data))
    return folder


def _huge_header_length(folder):
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    return folder


def _tiny_file(folder):
    (folder / "model.safetensors").write_bytes(b"abc")
    return folder


def _bad_entry(folder):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return folder


def _unknown_dtype(folder):
    header = json.dumps({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    return folder


SOURCE_ERRORS = [
    (_folder_without_checkpoint, "no model.safetensors or model.safetensors.index.json in "),
    (_missing_file, r"checkpoint .*nope.safetensors does not exist"),
    (
        _missing_shard,
        r"shard .*model-00002-of-00002.safetensors listed in .*index.json \(for tensor 'b'\) does not",
    ),
    (_bad_index, r"index.json is not a safetensors index with a 'weight_map'"),
    (_index_lies, r"puts tensor 'c' in model-00001-of-00002.safetensors, but .* has no such tensor"),
    (_corrupt_header, r"model.safetensors has a corrupt safetensors header"),
    (_huge_header_length, r"model.safetensors is not a safetensors file or is truncated: header of 1000000000"),
    (_tiny_file, r"model.safetensors is not a safetensors file: 3 bytes"),
    (_bad_entry, r"corrupt safetensors header: bad entry for tensor 'a'"),
    (_unknown_dtype, r"tensor 'a' in .*model.safetensors has dtype 'F4'"),
]


@pytest.mark.parametrize(
    ("make", "message"), SOURCE_ERRORS, ids=[make.__name__.strip("_") for make, _ in SOURCE_ERRORS]
)
def test_source_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        SafetensorsSource(path)


# --- sizes -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500MB", 500 * 10**6),
        ("5GB", 5 * 10**9),
        ("1.5GB", 1_500_000_000),
        ("0.1GB", 100_000_000),
        ("2GiB", 2 * 2**30),
        ("100KB", 100_000),
        ("64kib", 65536),
        (" 10 mb ", 10**7),
        ("123", 123),
        ("7B", 7),
        (4096, 4096),
    ],
    ids=lambda v: repr(v) if isinstance(v, str) else None,
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


BAD_SIZES = [
    ("5 gigabytes", "cannot read size '5 gigabytes'"),
    ("GB", "cannot read size 'GB'"),
    ("", "cannot read size ''"),
    ("-5MB", "cannot read size '-5MB'"),
    ("1.2.3GB", "cannot read size '1.2.3GB'"),
    ("0MB", "size '0MB' must be positive"),
    (0, "size 0 must be positive"),
    (-1, "size -1 must be positive"),
    (1.5, "size 1.5 is neither an int nor a string"),
    (True, "size True is neither an int nor a string"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_SIZES, ids=[repr(bad) for bad, _ in BAD_SIZES])
def test_parse_size_rejects(bad, message):
    with pytest.raises(CheckpointError, match=message):
        parse_size(bad)
