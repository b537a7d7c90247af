"""The output folder of a merge or an alignment: checked before any work, built in a staging folder beside it, and
moved into place only when complete.

What ``overwrite`` replaces: only a previous hf-otfusion output, i.e. a folder holding its ``hf_otfusion.yml`` and
nothing but the files that output wrote (listed in its ``.hf_otfusion-files.json``). A folder holding anything else
(notes, data, a parent model, the merge config), the current folder or one above it is refused, with or without
``overwrite``, before any model is downloaded or loaded.

Staging and scratch folders are named with the process id (``.OUT.<pid>-<hex>.tmp``, ``.otfusion-costs-<pid>-...``):
those of a process that no longer runs (killed by SIGKILL, a power cut) are removed by the next run beside them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputError

CONFIG_FILE = "hf_otfusion.yml"
PLAN_FILE = "plan.json"
CARD_FILE = "README.md"
MANIFEST_FILE = ".hf_otfusion-files.json"
OVERWRITE_HELP = ("replace OUT when it is a previous hf-otfusion output (it holds hf_otfusion.yml and only the files "
                  "that output wrote); any other non-empty folder is refused")
# files an output written before the manifest existed can hold (weights, configs, tokenizer/processor, card, plan)
_LEGACY_OUTPUT = re.compile(r"[^/]*\.(safetensors|json|yml|txt|model|md|jinja|tiktoken)")
_SCRATCH = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]+\.(tmp|old)|\.otfusion-costs-(?P<cpid>\d+)-.+")



def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def _foreign_files(out: Path) -> list[str]:
    """Files in ``out`` that no hf-otfusion output wrote (everything, when it holds no ``hf_otfusion.yml``)."""
    present = _files(out)
    if not (out / CONFIG_FILE).is_file():
        return present
    try:
        written = set(json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))["files"])
    except FileNotFoundError:  # written before the manifest existed: its known kinds of files only
        return [f for f in present if not _LEGACY_OUTPUT.fullmatch(f) and not f.startswith((".", "_"))]
    except (OSError, ValueError, KeyError, TypeError):
        return present
    return [f for f in present if f not in written and f != MANIFEST_FILE]


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_output(out: str | Path, overwrite: bool, *, inputs: Iterable[str | Path] = (),
                 needed_bytes: int | None = None) -> Path:
    """``out`` as the real path to write (a symbolic link: the folder it points to), or an ``OutputError``.

    Refused: a file; a non-empty folder without ``overwrite``; with ``overwrite``, a folder that is not a previous
    hf-otfusion output or holds files it did not write; a folder that holds the current folder or any of
    ``inputs`` (the config, local parents and datasets), whatever ``overwrite`` says; a place where no folder can
    be created; less free space than ``needed_bytes``.
    """
    given = Path(out).expanduser()
    out = given.resolve() if given.is_symlink() else Path(os.path.abspath(given))
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {given} exists and is not a folder")
    if _is_within(Path.cwd().resolve(), out.resolve()):
        raise OutputError(f"output folder {given} is the current folder or holds it: choose a new folder for the "
                          "output (replacing it would delete what you are working in)")
    for item in inputs:
        path = Path(item).expanduser().resolve()
        if _is_within(path, out.resolve()):
            raise OutputError(f"output folder {given} holds {item}, an input of this merge: choose another output "
                              "folder (it would be replaced)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"output folder {given} exists and is not empty: choose a new folder, or pass "
                              "--overwrite (overwrite=True) to replace a previous hf-otfusion output")
        foreign = _foreign_files(out)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
            what = ("it is not an hf-otfusion output (no hf_otfusion.yml)" if not (out / CONFIG_FILE).is_file()
                    else "it holds files hf-otfusion did not write")
            raise OutputError(f"--overwrite replaces only a previous hf-otfusion output, and {given} is not one: "
                              f"{what}: {shown}. Move them away or choose another output folder")
    base = _existing_ancestor(out.parent)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create the output folder {given}: {base} is not a writable folder")
    if needed_bytes:
        free = shutil.disk_usage(base).free
        if free < needed_bytes:
            raise OutputError(f"not enough free space for the output in {base}: about {needed_bytes / 1e6:,.0f} MB "
                              f"needed, {free / 1e6:,.0f} MB free")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(folder: Path) -> None:
    """Remove the staging and scratch folders in ``folder`` left by processes that no longer run."""
    with contextlib.suppress(OSError):
        for path in folder.iterdir():
            match = _SCRATCH.fullmatch(path.name)
            if match is None or not path.is_dir() or path.is_symlink():
                continue
            pid = int(match["pid"] or match["cpid"])
            if pid == os.getpid() or _alive(pid):
                continue
            if path.suffix == ".old" and not (folder / match["name"]).exists():
                path.rename(folder / match["name"])  # killed between the two renames: the old output comes back
            else:
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A staging folder beside ``out`` to build it in: on success it gets the umask's modes and its manifest, and
    replaces ``out`` (an old ``out`` goes only then, checked again); on any failure it is removed and ``out`` is
    untouched. A write that fails for lack of space or permission is an ``OutputError``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent)
    staging = _staging_folder(out)
    try:
        try:
            yield staging
        except Exception as err:
            _raise_if_storage(err, out)
            raise
        _write_manifest(staging)
        _modes_from_umask(staging)
        check_output(out, overwrite)  # nothing foreign was added while the merge ran
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _raise_if_storage(err: BaseException, out: Path) -> None:
    """An ``OutputError`` in one line for a write that failed on the disk (full, read-only, not permitted)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "Disk quota" in text:
        raise OutputError(f"cannot write {out}: no space left on the device; {out} was not changed") from None
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        raise OutputError(f"cannot write {out}: {text}; {out} was not changed") from None
    if type(err).__name__ == "SafetensorError":
        raise OutputError(f"cannot write the weights of {out}: {text}; {out} was not changed") from None


def _write_manifest(staging: Path) -> None:
    files = [f for f in _files(staging) if f != MANIFEST_FILE]
    (staging / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")


def _staging_folder(out: Path) -> Path:
    """A new empty folder beside ``out`` for building it. Unlike ``tempfile.mkdtemp`` (always 0700) it gets the
    mode the user's umask gives a new folder, as ``save_pretrained`` and ``save_for_hf`` folders do, since it
    becomes ``out``."""
    for _ in range(100):
        staging = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            staging.mkdir()
        except FileExistsError:
            continue
        return staging
    raise OutputError(f"cannot create a staging folder beside {out}")


def scratch_prefix() -> str:
    """The name prefix of a scratch folder beside an output (removed by the next run if this process dies)."""
    return f".otfusion-costs-{os.getpid()}-"


def _modes_from_umask(staging: Path) -> None:
    """Give every file under ``staging`` the mode a new file gets from the umask (``0o666 & ~umask``), every folder
    the staging folder's own. safetensors 0.8 writes through a temporary file that keeps mode 0600 whatever the
    umask (safetensors/safetensors#782), so without this ``model.safetensors`` is readable by its owner only."""
    folder_mode = stat.S_IMODE(staging.stat().st_mode) & 0o777  # mkdir gave it 0o777 & ~umask
    file_mode = folder_mode & 0o666
    for path in staging.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(folder_mode)
        elif path.is_file() and stat.S_IMODE(path.stat().st_mode) != file_mode:
            path.chmod(file_mode)


def _move_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.old")
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
