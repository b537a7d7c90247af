"""Lazy safetensors reading and streaming, sharded safetensors writing.

A :class:`TensorSource` hands out tensors one at a time by name, from memory (:class:`StateSource`) or from a
checkpoint on disk (:class:`SafetensorsSource`, which reads only the headers until a tensor is asked for). A
:class:`ShardedWriter` writes a checkpoint whose layout is known in advance, one tensor at a time, in the shard layout
that transformers' ``save_pretrained`` produces; so a model can be streamed from disk to disk holding one tensor.

Example:
    >>> from hf_otfusion.checkpoint import SafetensorsSource, ShardedWriter, parse_size
    >>> with SafetensorsSource("in_model") as src, ShardedWriter(  # doctest: +SKIP
    ...     "out_model", [(k, src.shape(k), src.dtype(k)) for k in src.keys()], max_shard_size=parse_size("2GB")
    ... ) as out:
    ...     for name in src.keys():
    ...         out.write(name, src.get(name).mul_(0.5))  # one tensor in memory at a time
"""

from __future__ import annotations

import difflib
import json
import math
import re
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol, runtime_checkable

import torch

from .errors import CheckpointError

__all__ = [
    "CheckpointError",
    "SafetensorsSource",
    "ShardedWriter",
    "StateSource",
    "TensorSource",
    "find_checkpoint",
    "parse_size",
]

# safetensors dtype names <-> torch dtypes (the subset both sides know; float8 types only where torch has them).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "C64": torch.complex64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPES.update(
    {
        name: getattr(torch, attr)
        for name, attr in [
            ("U64", "uint64"),
            ("U32", "uint32"),
            ("U16", "uint16"),
            ("F8_E4M3", "float8_e4m3fn"),
            ("F8_E5M2", "float8_e5m2"),
            ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
            ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
        ]
        if hasattr(torch, attr)
    }
)
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}

_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")



@runtime_checkable
class TensorSource(Protocol):
    """Named tensors, handed out one at a time: what a fusion reads a model's weights from."""

    def keys(self) -> list[str]:
        """Tensor names, in file / state-dict order."""
        ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor (on the CPU for files)."""
        ...


def _unknown(name: str, names: Sequence[str], where: str) -> CheckpointError:
    hint = difflib.get_close_matches(name, names, n=1)
    return CheckpointError(f"no tensor {name!r} in {where}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


class StateSource:
    """A :class:`TensorSource` over an in-memory state dict; ``get`` returns the stored tensor itself, not a copy.

    Example:
        >>> src = StateSource({"fc.weight": torch.zeros(10, 512)})
        >>> src.shape("fc.weight"), src.dtype("fc.weight")
        ((10, 512), torch.float32)
    """

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self._state[name]
        except KeyError:
            raise _unknown(name, list(self._state), "the state dict") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensor(name).dtype

    def get(self, name: str) -> torch.Tensor:
        return self._tensor(name)

    def nbytes(self) -> int:
        """Total bytes of all tensors."""
        return sum(t.numel() * t.element_size() for t in self._state.values())

    def __contains__(self, name: object) -> bool:
        return name in self._state

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._state)


def find_checkpoint(folder: str | Path, *, prefix: str = "model") -> Path | None:
    """``model.safetensors.index.json`` if present in ``folder``, else ``model.safetensors``, else ``None``."""
    for name in (f"{prefix}.safetensors.index.json", f"{prefix}.safetensors"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def parse_size(size: str | int) -> int:
    """Bytes from ``"500MB"``, ``"5GB"``, ``"1.5GB"``, ``"2GiB"``, ``"100KB"`` or an int.

    Units are decimal like transformers' ``max_shard_size`` (KB = 1e3, MB = 1e6, GB = 1e9), the ``KiB``/``MiB``/
    ``GiB`` ones binary; case does not matter. A malformed or non-positive size raises :class:`CheckpointError`.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise CheckpointError(f"size {size!r} is neither an int nor a string like '5GB'")
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE_RE.fullmatch(size)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise CheckpointError(f"cannot read size {size!r}: expected a number with KB, MB, GB, KiB, MiB or GiB")
        value = int(Decimal(match.group(1)) * _SIZE_UNITS[unit])  # Decimal: "0.1GB" is exactly 100000000
    if value <= 0:
        raise CheckpointError(f"size {size!r} must be positive")
    return value


# --- reading -------------------------------------------------------------------------------------------------------


def _read_header(path: Path) -> dict:
    """The parsed JSON header of one safetensors file, checked enough that shape/dtype lookups cannot fail."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            if size < 8:
                raise CheckpointError(f"{path} is not a safetensors file: {size} bytes, too short for a header")
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"{path} is not a safetensors file or is truncated: header of {length} bytes in a {size}-byte file"
                )
            raw = f.read(length)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header: not a JSON object")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = all(isinstance(d, int) and d >= 0 for d in [*shape, begin, end])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path} has a corrupt safetensors header: bad entry for tensor {name!r}: {info!r}")
        if dtype not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} in {path} has dtype {dtype!r}, which torch cannot load here")
    return header


def stored_values(folder: str | Path) -> int | None:
    """The number of weight values in a folder's ``*.safetensors`` files, read from their headers (no weights
    loaded); None when it holds none."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    return sum(math.prod(info["shape"]) for path in files for name, info in _read_header(path).items()
               if name != "__metadata__")


class SafetensorsSource:
    """Reads tensors one at a time from a safetensors checkpoint.

    ``path`` is a checkpoint folder (``model.safetensors``, or a sharded ``model.safetensors.index.json`` with its
    shards), an index file, or one ``.safetensors`` file. Names, shapes and dtypes come from the headers: no tensor
    data is read until :meth:`get`, which reads that tensor only (each shard is opened on first use and kept open until
    :meth:`close`).

    Example:
        >>> with SafetensorsSource("checkpoints/bert-base-uncased") as src:  # doctest: +SKIP
        ...     print(src.shape("embeddings.word_embeddings.weight"), src.dtype("embeddings.word_embeddings.weight"))
        ...     embeddings = src.get("embeddings.word_embeddings.weight")  # reads this one tensor only
        (30522, 768) torch.float32
    """

    files: list[Path]

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        target = find_checkpoint(self.path) if self.path.is_dir() else self.path
        if target is None:
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {self.path}")
        if not target.is_file():
            raise CheckpointError(f"checkpoint {target} does not exist")
        weight_map = self._read_index(target) if target.name.endswith(".json") else None
        if weight_map is None:
            self.files = [target]
        else:
            # Shard names sort in shard order (model-00001-of-...), whatever order the weight map lists them in.
            self.files = [target.parent / name for name in sorted(set(weight_map.values()))]
            for file in self.files:
                if not file.is_file():
                    first = next(k for k, v in weight_map.items() if target.parent / v == file)
                    raise CheckpointError(f"shard {file} listed in {target} (for tensor {first!r}) does not exist")
        self._where: dict[str, Path] = {}
        self._info: dict[str, dict] = {}
        for file in self.files:
            header = _read_header(file)
            entries = sorted(
                ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
            )
            for name, info in entries:
                if weight_map is None or weight_map.get(name) == file.name:
                    self._where[name], self._info[name] = file, info
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in self._where:
                    raise CheckpointError(f"{target} puts tensor {name!r} in {shard}, but {shard} has no such tensor")
        self._open: dict[Path, tuple[BinaryIO, int]] = {}

    @staticmethod
    def _read_index(index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except OSError as e:
            raise CheckpointError(f"cannot read {index}: {e.strerror or e}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index with a 'weight_map': {e!r}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has a malformed 'weight_map' (expected tensor name -> shard file)")
        return weight_map

    def keys(self) -> list[str]:
        return list(self._info)

    def _entry(self, name: str) -> dict:
        try:
            return self._info[name]
        except KeyError:
            raise _unknown(name, list(self._info), str(self.path)) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._entry(name)["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        """The tensor, read from its shard into a new CPU tensor.

        Plain reads, not a memory map: a process under a memory limit (``RLIMIT_DATA`` counts private file maps)
        pays for the tensor it reads, not for the whole shard.
        """
        info = self._entry(name)
        file = self._where[name]
        begin, end = info["data_offsets"]
        dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != size:
            raise CheckpointError(f"tensor {name!r} in {file} has {end - begin} bytes for shape {shape} of {dtype}")
        buf = torch.empty(size, dtype=torch.uint8)
        try:
            if file not in self._open:
                handle = open(file, "rb")  # noqa: SIM115 - kept open until close()
                (length,) = struct.unpack("<Q", handle.read(8))
                self._open[file] = (handle, 8 + length)
            handle, start = self._open[file]
            handle.seek(start + begin)
            read = handle.readinto(buf.numpy()) if size else 0
        except OSError as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {file}: {e.strerror or e}") from None
        if read != size:
            raise CheckpointError(f"{file} is truncated: tensor {name!r} needs {size} bytes, {read} were read")
        return buf.view(dtype).reshape(shape)

    def nbytes(self) -> int:
        """Total bytes of all tensors."""
        return sum(end - begin for begin, end in (info["data_offsets"] for info in self._info.values()))

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the first file (e.g. ``{"format": "pt"}``)."""
        return dict(_read_header(self.files[0]).get("__metadata__") or {}) if self.files else {}

    def close(self) -> None:
        """Close the shard files; tensors already returned stay valid."""
        for handle, _ in self._open.values():
            handle.close()
        self._open.clear()

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._info)

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- writing -------------------------------------------------------------------------------------------------------


def _header_bytes(entries: dict[str, dict], metadata: Mapping[str, str]) -> bytes:
    header = json.dumps({"__metadata__": dict(metadata), **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # as safetensors does, so the data buffer starts 8-aligned
    return struct.pack("<Q", len(header)) + header


class ShardedWriter:
    """Writes a safetensors checkpoint whose layout is known in advance, tensor by tensor, in any order.

    The layout fixes every tensor's file and offset up front, so each :meth:`write` puts the tensor's bytes straight
    at their place in a pre-sized file and no more than one tensor is held at a time. Tensors lie back to back in
    layout order. Over ``max_shard_size`` (bytes, or a string for :func:`parse_size`) the checkpoint is split greedily
    into HF-style shards ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``, the layout
    transformers' ``save_pretrained`` writes and ``from_pretrained`` loads; a tensor over the limit gets a shard of
    its own. A single shard is ``model.safetensors``. Stale ``model*.safetensors`` files and index of an earlier
    save in ``folder`` are deleted first.

    The headers and the index are written by :meth:`close`, once every tensor is in: a checkpoint left unfinished by
    an error has zeroed headers, so it fails to load instead of loading zeros.

    Example:
        >>> state = model.state_dict()  # doctest: +SKIP
        >>> layout = [(k, tuple(t.shape), t.dtype) for k, t in state.items()]  # doctest: +SKIP
        >>> with ShardedWriter("out", layout, max_shard_size="500MB") as writer:  # doctest: +SKIP
        ...     for name, _, _ in reversed(layout):  # any order
        ...         writer.write(name, state[name])
        >>> [f.name for f in writer.files]  # doctest: +SKIP
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """

    files: list[Path]
    index: Path | None

    def __init__(
        self,
        folder: str | Path,
        layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        max_shard_size: int | str | None = None,
        metadata: Mapping[str, str] | None = None,
        prefix: str = "model",
    ) -> None:
        self.folder = Path(folder)
        limit = None if max_shard_size is None else parse_size(max_shard_size)
        meta = {"format": "pt", **(metadata or {})}
        bad_meta = [k for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad_meta:
            raise CheckpointError(f"safetensors metadata must map str to str; not so for {bad_meta}")

        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        shards: list[list[tuple[str, int]]] = [[]]
        used = 0
        for name, shape, dtype in layout:
            shape = tuple(int(d) for d in shape)
            if name in self._specs:
                raise CheckpointError(f"tensor {name!r} appears twice in the layout")
            if name == "__metadata__" or not isinstance(name, str):
                raise CheckpointError(f"{name!r} cannot be a tensor name in a safetensors file")
            if dtype not in _DTYPE_NAMES:
                raise CheckpointError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
            if any(d < 0 for d in shape):
                raise CheckpointError(f"tensor {name!r} has a negative dimension in shape {shape}")
            self._specs[name] = (shape, dtype)
            size = math.prod(shape) * dtype.itemsize
            if limit is not None and shards[-1] and used + size > limit:
                shards.append([])
                used = 0
            shards[-1].append((name, size))
            used += size
            if limit is not None and size > limit:  # an oversize tensor keeps its shard to itself
                shards.append([])
                used = 0
        if len(shards) > 1 and not shards[-1]:
            shards.pop()

        n = len(shards)
        names = [f"{prefix}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] if n > 1 else []
        self.files = [self.folder / name for name in names or [f"{prefix}.safetensors"]]
        self.index = self.folder / f"{prefix}.safetensors.index.json" if n > 1 else None
        self._total = sum(size for shard in shards for _, size in shard)
        self._place: dict[str, tuple[int, int, int]] = {}  # name -> (file number, absolute offset, bytes)
        self._headers: list[bytes] = []
        for i, shard in enumerate(shards):
            entries, offset = {}, 0
            for name, size in shard:
                shape, dtype = self._specs[name]
                end = offset + size
                entries[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
                offset = end
            header = _header_bytes(entries, meta)
            self._headers.append(header)
            for name, size in shard:
                self._place[name] = (i, len(header) + entries[name]["data_offsets"][0], size)

        self._written: set[str] = set()
        self._handles: list[BinaryIO] = []
        self._closed = False
        self._finished = False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._remove_stale(prefix)
            for file, header, shard in zip(self.files, self._headers, shards, strict=True):
                handle = open(file, "wb")  # noqa: SIM115 - kept open until close()
                self._handles.append(handle)
                handle.truncate(len(header) + sum(size for _, size in shard))
        except OSError as e:
            self._close_handles()
            raise CheckpointError(f"cannot create checkpoint files in {self.folder}: {e.strerror or e}") from None

    def _remove_stale(self, prefix: str) -> None:
        # Left in place, an old model.safetensors would shadow a new sharded save (loaders prefer it) and old shards
        # would be listed by nothing; transformers' save_pretrained cleans up the same way.
        stale = re.compile(
            rf"{re.escape(prefix)}(\.safetensors|\.safetensors\.index\.json|-\d{{5}}-of-\d{{5}}\.safetensors)"
        )
        for path in self.folder.iterdir():
            if stale.fullmatch(path.name) and path.is_file() and path not in self.files:
                path.unlink()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor of the layout; its shape and dtype must match the layout exactly. Any device is fine."""
        if self._closed:
            raise CheckpointError(f"cannot write tensor {name!r}: the writer for {self.folder} is closed")
        if name not in self._specs:
            raise _unknown(name, list(self._specs), f"the layout of {self.folder}")
        if name in self._written:
            raise CheckpointError(f"tensor {name!r} was already written to {self.folder}")
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        shape, dtype = self._specs[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise CheckpointError(
                f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, but the layout says {shape} {dtype}"
            )
        if tensor.layout != torch.strided or tensor.is_meta:
            raise CheckpointError(f"tensor {name!r} has no dense data to write ({tensor.layout}, {tensor.device})")
        file, offset, size = self._place[name]
        if size:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            if sys.byteorder == "big":  # safetensors is little-endian: swap each number's bytes
                data = data.view(-1, dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize).flip(1).reshape(-1)
            try:
                self._handles[file].seek(offset)
                self._handles[file].write(data.numpy().data)
            except OSError as e:
                where = self.files[file]
                raise CheckpointError(f"cannot write tensor {name!r} to {where}: {e.strerror or e}") from None
        self._written.add(name)

    def close(self) -> list[Path]:
        """Finish the checkpoint and return the files written (shards, then the index if sharded).

        Raises :class:`CheckpointError` naming the tensors never written; the files are closed either way.
        """
        if self._closed:
            if not self._finished:
                raise CheckpointError(f"the checkpoint in {self.folder} was closed unfinished")
            return self._result()
        self._closed = True
        missing = [name for name in self._specs if name not in self._written]
        try:
            if missing:
                more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
                shown = ", ".join(repr(m) for m in missing[:10]) + more
                raise CheckpointError(f"{len(missing)} tensor(s) never written to {self.folder}: {shown}")
            for handle, header in zip(self._handles, self._headers, strict=True):
                handle.seek(0)
                handle.write(header)
            if self.index is not None:
                weight_map = {name: self.files[file].name for name, (file, _, _) in self._place.items()}
                index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
                self.index.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        except OSError as e:
            raise CheckpointError(f"cannot finish the checkpoint in {self.folder}: {e.strerror or e}") from None
        finally:
            self._close_handles()
        self._finished = True
        return self._result()

    def _result(self) -> list[Path]:
        return [*self.files, *([self.index] if self.index else [])]

    def _close_handles(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles = []

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True
            self._close_handles()
