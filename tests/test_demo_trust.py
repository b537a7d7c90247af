"""The demo's trust boundary (issue 25): what a stranger who reaches the app can make the server read or do.

One test per hole the tester found: a share link or a public address without Space mode, a push with the host's
stored token, server files read through ``datasets`` (packaged builders, a card's data files, image paths), and a
download larger than the size check saw. Each drives the app in Space mode (gradio_client against a served app,
or its handlers), with models and datasets served by the local Hub test server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio", reason="the demo extra is not installed: pip install 'hf-otfusion[demo]'")
pytest.importorskip("matplotlib")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
from hub_server import DUMMY_TOKEN, HubServer  # noqa: E402

from hf_otfusion.demo import app as demo_app  # noqa: E402
from hf_otfusion.demo.core import DemoError, DemoLimits, FusionRequest, OutputStore, run_demo_fusion  # noqa: E402
from hf_otfusion.demo.inputs import find_examples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SEED0, SEED1 = "example:mnist-resnet-seed0", "example:mnist-resnet-seed1"
LIMITS = DemoLimits(max_eval_samples=200, max_calibration_samples=200, max_interpolation_points=5, timeout_s=240)
FAST = dict(alignment="weights", repair="none", evaluation_samples=20, calibration_samples=20, interpolation_points=3)

pytestmark = pytest.mark.skipif(not (EXAMPLES / "models" / "mnist-resnet-seed0").is_dir(),
                                reason="the bundled example models (examples/models) are missing")


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def space_url(tmp_path_factory):
    """The demo in Space mode, served on a free port of 127.0.0.1."""
    demo = demo_app.build_app(space_mode=True, limits=LIMITS, examples_dir=EXAMPLES,
                              output_dir=tmp_path_factory.mktemp("space-outputs"))
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                show_error=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def _fuse(client, models=(SEED0, SEED1), dataset="example:mnist", split="test"):
    return client.predict(models=list(models), alignment="weights", solver="emd", reg=0.05, marginals="uniform",
                          dataset=dataset, evaluation_split=split, evaluation_samples=20, calibration_split="train",
                          calibration_samples=20, points=3, repair="none", api_name="/fuse")


def _handler(demo, api_name: str):
    return next(f.fn for f in demo.fns.values() if f.api_name == api_name)


def _png(path: Path) -> Path:
    PIL.Image.fromarray(np.full((28, 28), 200, dtype=np.uint8)).save(path)
    return path


def _parquet(rows: dict, features: datasets.Features) -> bytes:
    """A parquet file as the Hub holds one, written by pyarrow (datasets' writer would open the image paths)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(rows, schema=features.arrow_schema), buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Hole 2: a share link or a public address serves a non-Space app; an empty token box pushes with the host's token


def test_share_link_or_public_host_is_space_mode(monkeypatch):
    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, *a, **k: launched.append(self))
    monkeypatch.delenv("SPACE_ID", raising=False)
    for kwargs in (dict(share=True), dict(host="0.0.0.0"), dict(host="192.168.1.20")):
        demo = demo_app.launch(**kwargs, limits=LIMITS, examples_dir=EXAMPLES)
        fuse = _handler(demo, "fuse")
        with pytest.raises(gr.Error, match="does not read local files"):  # outside Space mode: read from disk
            fuse([SEED0, "/no/such/folder"], "weights", "emd", 0.05, "uniform", "none", "example:mnist", "test", 20,
                 "train", 20, 3, progress=lambda *a, **k: None)
        demo.close()
    assert len(launched) == 3
    with pytest.raises(ValueError, match="Space mode"):
        demo_app.launch(share=True, space_mode=False, limits=LIMITS, examples_dir=EXAMPLES)
    local = demo_app.build_app(space_mode=False, limits=LIMITS, examples_dir=EXAMPLES)
    with pytest.raises(ValueError, match="space_mode=True"):
        local.launch(share=True)
    with pytest.raises(ValueError, match="space_mode=True"):
        local.launch(server_name="0.0.0.0")
    assert demo_app.is_loopback("127.0.0.1") and demo_app.is_loopback("::1") and demo_app.is_loopback("localhost")
    assert not demo_app.is_loopback("0.0.0.0") and not demo_app.is_loopback("example.org")
    # a loopback launch stays as asked (local files allowed), and --help says when Space mode turns on
    from typer.testing import CliRunner

    from hf_otfusion.cli import app

    text = " ".join(CliRunner().invoke(app, ["demo", "--help"]).output.split())
    assert "--share" in text and "non-loopback" in text and "SPACE_ID" in text


def test_empty_token_box_never_pushes_with_the_stored_token(hub_server: HubServer, tmp_path):
    """HF_TOKEN (the host's) may write; an empty or blank box is refused in every mode and nothing reaches the Hub."""
    store = OutputStore(tmp_path / "outputs")
    result = run_demo_fusion(FusionRequest(models=(SEED0, SEED1), **FAST), limits=LIMITS,
                             examples=find_examples(EXAMPLES), store=store)
    hub_server.write_tokens = frozenset({DUMMY_TOKEN})  # the token isolate_hf_home put in HF_TOKEN
    hub_server.clear_requests()
    for space_mode in (False, True):
        demo = demo_app.build_app(space_mode=space_mode, limits=LIMITS, examples_dir=EXAMPLES, output_dir=store.root)
        push = _handler(demo, "push")
        for token in ("", "   ", None):
            with pytest.raises(gr.Error, match="paste a Hugging Face token"):
                push("me/taken-over", token, True, result)
        demo.close()
    assert not hub_server.has_repo("me/taken-over") and not hub_server.commit_requests()
    assert not [r for r in hub_server.requests if r.authorized]


# ----------------------------------------------------------------------------------------------------------
# Hole 3: server files read through datasets (packaged builders, a card's data files, image paths)


@pytest.fixture
def secrets_dir(tmp_path, monkeypatch):
    """A working directory holding a CSV of secrets (what the tester's ``csv`` dataset read back)."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    (folder / "secrets.csv").write_text("api_key_column,password_column\nhf_x,hunter2\n", encoding="utf-8")
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.parametrize("dataset", ["csv", "json", "imagefolder", "text", "CSV"])
def test_space_mode_reads_no_server_files_through_datasets(space_url, secrets_dir, dataset):
    """datasets' packaged builders scan the working folder (the tester got secrets.csv's column names back)."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="builder names") as caught:
        _fuse(Client(space_url, verbose=False), dataset=dataset, split="train")
    assert "api_key_column" not in str(caught.value) and "hunter2" not in str(caught.value)


def test_space_mode_reads_no_data_files_a_card_points_at_on_the_server(space_url, secrets_dir, hub_server):
    """A Hub dataset card with absolute data_files: refused from the card, the same for an existing and a missing
    folder (datasets would look on the server's disk first)."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(space_url, verbose=False)
    messages = []
    for name, folder in (("here", secrets_dir), ("gone", secrets_dir / "gone")):
        card = (f"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: {folder}/*.csv\n"
                "---\n")
        hub_server.seed_repo(f"me/card-{name}", {"README.md": card, "data.csv": "a,b\n1,2\n"}, repo_type="dataset")
        with pytest.raises(AppError, match="outside the dataset repo") as caught:
            _fuse(client, dataset=f"me/card-{name}", split="train")
        messages.append(str(caught.value).replace(f"me/card-{name}", "REPO").replace(str(folder), "PATH"))
    assert messages[0] == messages[1]


def test_space_mode_opens_no_image_paths(space_url, hub_server, tmp_path):
    """String and {"path": ...} image values are refused unopened: a server PNG, /etc/shadow and a missing file all
    get the same answer (no existence oracle). Image bytes still work."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    png = _png(tmp_path / "server.png")
    label = datasets.ClassLabel(num_classes=10)
    image = datasets.Features({"image": datasets.Image(), "label": label})
    strings = datasets.Features({"image": datasets.Value("string"), "label": label})
    paths = {"real": str(png), "shadow": "/etc/shadow", "missing": str(tmp_path / "missing.png")}
    for name, path in paths.items():
        rows = {"image": [path] * 4, "label": [1, 2, 3, 4]}
        hub_server.seed_repo(f"me/str-{name}", {"test.parquet": _parquet(rows, strings),
                                               "train.parquet": _parquet(rows, strings)}, repo_type="dataset")
        rows = {"image": [{"path": path, "bytes": None}] * 4, "label": [1, 2, 3, 4]}
        hub_server.seed_repo(f"me/img-{name}", {"test.parquet": _parquet(rows, image),
                                               "train.parquet": _parquet(rows, image)}, repo_type="dataset")
    client = Client(space_url, verbose=False)
    messages = set()
    for kind in ("str", "img"):
        for name in paths:
            with pytest.raises(AppError) as caught:
                _fuse(client, dataset=f"me/{kind}-{name}")
            messages.add(str(caught.value))
    assert len(messages) == 1 and "file paths" in messages.pop()
    rows = {"image": [{"path": "x.png", "bytes": png.read_bytes()}] * 4, "label": [1, 2, 3, 4]}
    hub_server.seed_repo("me/bytes", {"test.parquet": _parquet(rows, image), "train.parquet": _parquet(rows, image)},
                         repo_type="dataset")
    status = _fuse(client, dataset="me/bytes")[0]
    assert status.startswith("**Done**")


# ----------------------------------------------------------------------------------------------------------
# Hole 4: the size check saw model.safetensors only; the download fetched every *.safetensors of the repo


def test_space_mode_downloads_only_what_the_loader_reads(space_url, hub_server, tmp_path):
    from gradio_client import Client

    folder = EXAMPLES / "models" / "mnist-resnet-seed0"
    extra = {"unreferenced.safetensors": b"\0" * 3_000_000, "notes.json": "{}" + " " * 1_000_000}
    hub_server.seed_repo("me/seed0", {**{p.name: p for p in folder.iterdir()}, **extra})
    status = _fuse(Client(space_url, verbose=False), models=("me/seed0", SEED1))[0]
    assert status.startswith("**Done**")
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub_server.find_requests(contains="/me/seed0/resolve/")}
    assert "model.safetensors" in fetched and "config.json" in fetched
    assert not fetched & set(extra), fetched

    # the size check counts every file the download would fetch, and refuses before fetching the weights
    hub_server.seed_repo("me/seed0-big", {**{p.name: p for p in folder.iterdir()}})
    hub_server.clear_requests()
    small = dataclasses.replace(LIMITS, max_download_mb=1.0)  # model.safetensors is 1.5 MB
    with pytest.raises(DemoError, match=r"1\.5 MB, more than the 1\.0 MB allowed"):
        run_demo_fusion(FusionRequest(models=("me/seed0-big", SEED1), **FAST), limits=small,
                        examples=find_examples(EXAMPLES), store=OutputStore(tmp_path / "out"), space_mode=True)
    assert not hub_server.find_requests(contains="/me/seed0-big/resolve/")


def test_space_mode_never_sends_the_hosts_token(space_url, hub_server):
    """The host's HF_TOKEN stays home: a stranger's fusion reads the Hub as an anonymous user, so the host's
    private or gated repos are out of reach (before: every download carried the host's token)."""
    from gradio_client import Client

    assert os.environ.get("HF_TOKEN") == DUMMY_TOKEN  # the host has a token
    folder = EXAMPLES / "models" / "mnist-resnet-seed0"
    hub_server.seed_repo("me/public-seed0", {p.name: p for p in folder.iterdir()})
    hub_server.clear_requests()
    status = _fuse(Client(space_url, verbose=False), models=("me/public-seed0", SEED1))[0]
    assert status.startswith("**Done**")
    sent = hub_server.find_requests(contains="/me/public-seed0")
    assert sent and not any(r.authorized for r in sent)
