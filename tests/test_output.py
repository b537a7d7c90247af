"""Faults against the output folder and the merge's inputs: nothing a user owns is touched, every fault is one
``Error:`` paragraph, nothing half-written stays behind (issue 25's fault-injection suite)."""

from __future__ import annotations

import errno
import importlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import yaml
from checkpoints import timm_resnet
from hub_server import HubServer
from typer.testing import CliRunner

from hf_otfusion.checkpoint import ShardedWriter
from hf_otfusion.cli import app
from hf_otfusion.config import load_config
from hf_otfusion.output import MANIFEST_FILE, OutputError, check_output, remove_stale
from hf_otfusion.testing import tiny_llama

runner = CliRunner()


def _config(path: Path, models: list[str], **fields) -> Path:
    path.write_text(yaml.safe_dump({"models": [{"model": m} for m in models], **fields}))
    return path


def _merge(*args: object):
    return runner.invoke(app, ["merge", *map(str, args), "-q"])


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path) -> Path:
    """A user's project folder: two parents, the merge config and notes."""
    proj = tmp_path / "proj"
    timm_resnet(proj / "a", seed=0)
    timm_resnet(proj / "b", seed=1)
    _config(proj / "merge.yml", [str(proj / "a"), str(proj / "b")])
    (proj / "notes.txt").write_text("mine")
    return proj


def test_overwrite_never_replaces_a_folder_holding_the_inputs(project):
    before = _tree(project)
    result = _merge(project / "merge.yml", project, "--overwrite")
    assert result.exit_code == 1 and "Error:" in result.output and "Traceback" not in result.output
    assert "an input of this merge" in result.output
    assert _tree(project) == before


def test_overwrite_never_replaces_unrelated_files_or_the_current_folder(project, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep.csv").write_text("x\n1\n")
    result = _merge(project / "merge.yml", data, "--overwrite")
    assert result.exit_code == 1 and "not an hf-otfusion output" in result.output and "keep.csv" in result.output
    assert _tree(data) == {"keep.csv": b"x\n1\n"}

    work = tmp_path / "work"
    (work / "inner").mkdir(parents=True)
    (work / "hf_otfusion.yml").write_text("looks like an output")
    monkeypatch.chdir(work / "inner")
    for out in (".", "..", str(work)):
        result = _merge(project / "merge.yml", out, "--overwrite")
        assert result.exit_code == 1 and "current folder" in result.output, result.output
    assert (work / "hf_otfusion.yml").is_file() and (work / "inner").is_dir()


def test_overwrite_replaces_its_own_output_but_not_files_added_to_it(project, tmp_path):
    out = tmp_path / "out"
    assert _merge(project / "merge.yml", out).exit_code == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())["files"]
    assert {"model.safetensors", "hf_otfusion.yml", "README.md", "plan.json"} <= set(manifest)
    (out / "my-eval.txt").write_text("results")
    result = _merge(project / "merge.yml", out, "--overwrite")
    assert result.exit_code == 1 and "my-eval.txt" in result.output and "did not write" in result.output
    (out / "my-eval.txt").unlink()
    assert _merge(project / "merge.yml", out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "proj"]


def test_a_symlinked_output_stays_a_link(project, tmp_path):
    real = tmp_path / "real"
    link = tmp_path / "link"
    assert _merge(project / "merge.yml", real).exit_code == 0
    link.symlink_to(real)
    assert _merge(project / "merge.yml", link, "--overwrite").exit_code == 0
    assert link.is_symlink() and link.resolve() == real.resolve() and (real / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "proj", "real"]


def test_a_read_only_place_is_refused_before_any_work(project, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(ro)], capture_output=True).returncode:
        ro.chmod(0o555)  # not root: the mode is enough
        if os.access(ro, os.W_OK):
            pytest.skip("cannot make a read-only folder here (root without mount)")
    try:
        result = _merge(project / "merge.yml", ro / "out")
        assert result.exit_code == 1 and "not a writable folder" in result.output and "Traceback" not in result.output
        assert "resolving models" not in result.output
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KB tmpfs where this machine allows mounting one (root), else None."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "none", str(disk)], capture_output=True).returncode:
        yield None
        return
    yield disk
    subprocess.run(["umount", str(disk)], capture_output=True)


def test_disk_full_is_one_line_and_leaves_nothing(project, tmp_path, small_disk, monkeypatch):
    if small_disk is not None:  # a real small disk: the estimate (126 k values x 4 bytes) does not fit
        result = _merge(project / "merge.yml", small_disk / "out")
        assert result.exit_code == 1 and "not enough free space" in result.output, result.output
        assert list(small_disk.iterdir()) == []
    # a disk that fills up during the write (the estimate passed): simulated ENOSPC from the streamed writer, and
    # from the library's own save on the in-memory path
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    linear = _config(tmp_path / "lin.yml", [str(project / "a"), str(project / "b")], merge_method="linear")
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(ShardedWriter, "write", full)
        result = _merge(linear, out)
    assert result.exit_code == 1 and "no space left" in result.output and "was not changed" in result.output
    assert "Traceback" not in result.output
    merge_package = importlib.import_module("hf_otfusion.merge")  # hf_otfusion exports a function of that name
    monkeypatch.setattr(importlib.import_module("hf_otfusion.merge.write"), "save_model", full)
    with pytest.raises(OutputError, match="no space left"):
        merge_package.merge(load_config(linear), out, progress=False, stream=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import hf_otfusion.output as output
    from hf_otfusion import cli

    sig = getattr(signal, sys.argv[1])

    def killed(staging):  # every file of the output is written, the folder not yet moved into place
        os.kill(os.getpid(), sig)
    output._write_manifest = killed
    sys.argv = ["hf-otfusion", "merge", sys.argv[2], sys.argv[3], "-q"]
    cli.main()
""")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_merge_killed_while_writing_leaves_nothing_behind(project, tmp_path, sig):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, sig, str(project / "merge.yml"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and not out.exists()
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    if sig == "SIGTERM":  # handled like Ctrl-C: the staging folder goes at once
        assert left == [] and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    else:  # nothing runs after SIGKILL: the next run beside it removes what the dead process left
        assert len(left) == 1
        assert _merge(project / "merge.yml", out).exit_code == 0
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_stale_folders_of_live_processes_are_kept(tmp_path):
    mine = tmp_path / f".out.{os.getpid()}-abcd.tmp"
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    dead = tmp_path / f".out.{dead_pid}-abcd.tmp"
    costs = tmp_path / f".otfusion-costs-{dead_pid}-xyz"
    old = tmp_path / f".prev.{dead_pid}-abcd.old"  # killed between the two renames of a replace
    unrelated = tmp_path / ".out.notapid.tmp"
    for path in (mine, dead, costs, old, unrelated):
        path.mkdir()
    remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, unrelated.name, "prev"])


def test_check_output_api(tmp_path):
    with pytest.raises(OutputError, match="holds"):
        check_output(tmp_path, False, inputs=[tmp_path / "model"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        check_output(tmp_path / "file", True)
    assert check_output(tmp_path / "new", False) == (tmp_path / "new").absolute()


def test_failed_push_says_the_output_is_intact_and_how_to_push_again(project, tmp_path, hub_server: HubServer,
                                                                    monkeypatch):
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None)  # retries without waiting
    handle = hub_server._handle

    def die_on_upload(h, method, path, *args):
        if path.startswith("/lfs-upload"):  # the server dies mid-upload: no answer, and no server after it
            threading.Thread(target=hub_server.stop).start()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return None
        return handle(h, method, path, *args)

    monkeypatch.setattr(hub_server, "_handle", die_on_upload)
    out = tmp_path / "out"
    result = _merge(project / "merge.yml", out, "--push-to-hub", "me/fused")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"hf-otfusion push {out} me/fused" in result.output and "was not changed" in result.output
    assert (out / "model.safetensors").is_file()


def test_push_command_pushes_an_output(project, tmp_path, hub_server: HubServer):
    out = tmp_path / "out"
    assert _merge(project / "merge.yml", out).exit_code == 0
    result = runner.invoke(app, ["push", str(out), "me/fused"])
    assert result.exit_code == 0 and "pushed to" in result.output, result.output
    assert "model.safetensors" in hub_server.list_files("me/fused")
    missing = runner.invoke(app, ["push", str(tmp_path / "nope"), "me/fused"])
    assert missing.exit_code == 1 and "is not a folder" in missing.output


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    config = tmp_path / "c.yml"
    config.write_bytes(b"models:\n  - model: caf\xe9\n")
    result = _merge(config, tmp_path / "out")
    assert result.exit_code == 1 and "not a text file in UTF-8" in result.output and "Traceback" not in result.output


def test_linear_refuses_a_parent_with_nan(project, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(project / "b" / "model.safetensors")
    name = next(n for n, t in weights.items() if t.is_floating_point())
    weights[name][0] = float("nan")
    save_file(weights, project / "b" / "model.safetensors")
    config = _config(tmp_path / "lin.yml", [str(project / "a"), str(project / "b")], merge_method="linear")
    result = _merge(config, tmp_path / "out")
    assert result.exit_code == 1 and "NaN or infinite" in result.output and name in result.output
    assert not (tmp_path / "out").exists()


def test_parents_with_other_tokenizers_are_refused_unless_the_config_picks_one(tmp_path):
    import shutil

    from transformers import AutoTokenizer

    a, b = tiny_llama(tmp_path / "a", seed=0), tiny_llama(tmp_path / "b", seed=1)
    tok = AutoTokenizer.from_pretrained(str(b))
    vocab = tok.backend_tokenizer.to_str()
    swapped = json.loads(vocab)
    table = swapped["model"]["vocab"]
    first, second = sorted(table, key=table.get)[65:67]  # same size, two ids swapped
    table[first], table[second] = table[second], table[first]
    (b / "tokenizer.json").write_text(json.dumps(swapped))
    result = _merge(_config(tmp_path / "c.yml", [str(a), str(b)], merge_method="linear"), tmp_path / "out")
    assert result.exit_code == 1 and "another tokenizer" in result.output and "tokenizer_source" in result.output
    kept = _config(tmp_path / "k.yml", [str(a), str(b)], merge_method="linear", tokenizer_source="base")
    assert _merge(kept, tmp_path / "out").exit_code == 0
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()
    shutil.rmtree(tmp_path / "out")
    crimes = _merge(tmp_path / "c.yml", tmp_path / "out", "--allow-crimes", "--lazy-unpickle", "--copy-tokenizer")
    assert crimes.exit_code == 0, crimes.output  # mergekit's flags: --allow-crimes keeps the target's tokenizer
    assert yaml.safe_load((tmp_path / "out" / "hf_otfusion.yml").read_text())["tokenizer_source"] == "base"


def test_remote_code_is_never_run_or_asked_for(tmp_path):
    a, b = tiny_llama(tmp_path / "a", seed=0), tiny_llama(tmp_path / "b", seed=1)
    marker = tmp_path / "ran"
    for parent in (a, b):
        (parent / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                            "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
        cfg = json.loads((parent / "tokenizer_config.json").read_text())
        cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
        cfg["tokenizer_class"] = "EvilTokenizer"  # no class of that name in transformers: only remote code has it
        (parent / "tokenizer_config.json").write_text(json.dumps(cfg))
    config = _config(tmp_path / "c.yml", [str(a), str(b)], merge_method="linear")
    proc = subprocess.run([sys.executable, "-m", "hf_otfusion.cli", "merge", str(config), str(tmp_path / "out"),
                           "-q"], input="y\n", capture_output=True, text=True, timeout=300)
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists()
