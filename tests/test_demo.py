"""The gradio demo: its logic without a browser, the app driven by gradio_client, a headless Chromium run, and the
Space folder generator.

Everything runs on the bundled example models (examples/models, two timm test_resnet MNIST models) and data
(examples/data/mnist), offline.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from the app under test
pytest.importorskip("gradio", reason="the demo extra is not installed: pip install 'hf-otfusion[demo]'")
pytest.importorskip("matplotlib")

from hf_otfusion.demo.core import (  # noqa: E402
    DemoError,
    DemoLimits,
    DemoTimeout,
    FusionRequest,
    InterpolationCurve,
    OutputStore,
    build_config,
    check_count,
    find_examples,
    precheck_size,
    resolve_dataset,
    resolve_model,
    run_demo_fusion,
    run_with_timeout,
    safetensors_values,
    state_values,
)
from hf_otfusion.demo.plots import interpolation_figure, transport_map_figure  # noqa: E402
from hf_otfusion.errors import FusionError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SEED0, SEED1 = "example:mnist-resnet-seed0", "example:mnist-resnet-seed1"
SECRET = "hf_DemoTokenThatMustNeverBeStored0123456789"
# small settings keep each fusion of the example models to a few seconds
SMALL = dict(evaluation_samples=200, calibration_samples=200, interpolation_points=5)
TEST_LIMITS = DemoLimits(max_eval_samples=200, max_calibration_samples=200, max_interpolation_points=5, timeout_s=240)

pytestmark = pytest.mark.skipif(not (EXAMPLES / "models" / "mnist-resnet-seed0").is_dir(),
                                reason="the bundled example models (examples/models) are missing")


@pytest.fixture(scope="module")
def examples():
    return find_examples(EXAMPLES)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return OutputStore(tmp_path_factory.mktemp("demo-outputs"))


@pytest.fixture(scope="module")
def fused(examples, store):
    """One fusion of the two bundled models, activations alignment (the demo's default)."""
    return run_demo_fusion(FusionRequest(models=(SEED0, SEED1), **SMALL), limits=TEST_LIMITS, examples=examples,
                           store=store)


# ----------------------------------------------------------------------------------------------------------
# Logic: limits and input checks


def test_examples_are_found(examples):
    assert examples.model_choices() == [SEED0, SEED1]
    assert examples.dataset_choices() == ["example:mnist"]


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_models must be at least 2"):
        DemoLimits(max_models=1)
    with pytest.raises(ValueError, match="timeout_s"):
        DemoLimits(timeout_s=0)
    with pytest.raises(ValueError, match="max_params"):
        DemoLimits(max_params=-5)
    limits = DemoLimits()
    with pytest.raises(AttributeError):
        limits.max_models = 10  # frozen


@pytest.mark.parametrize("text", ["/etc", "./examples/models/mnist-resnet-seed0", "local-dir:/tmp", "~/models",
                                  "examples/models/mnist-resnet-seed0", "..\\secrets", "a/b/c", "../x"])
def test_space_mode_refuses_local_paths(examples, text):
    with pytest.raises(DemoError, match="does not read local files"):
        resolve_model(text, examples, space_mode=True)
    with pytest.raises(DemoError, match="does not read local files"):
        resolve_dataset(text, examples, space_mode=True)


def test_model_and_dataset_inputs(examples):
    resolved = Path(resolve_model(SEED0, examples, space_mode=True))
    assert resolved.resolve() == (EXAMPLES / "models" / "mnist-resnet-seed0").resolve()
    # in a Space a Hub id is read from the Hub only, even where a folder of that name exists (decided from the text)
    assert resolve_model("timm/resnet18.a1_in1k@main", examples, space_mode=True) == "hf-hub:timm/resnet18.a1_in1k@main"
    assert resolve_model("examples/models", examples, space_mode=True) == "hf-hub:examples/models"
    assert resolve_dataset("ylecun/mnist", examples, space_mode=True) == "ylecun/mnist"
    # outside a Space, local folders are fine
    local = str(EXAMPLES / "models" / "mnist-resnet-seed1")
    assert resolve_model(local, examples, space_mode=False) == local
    with pytest.raises(DemoError, match=r"unknown bundled example 'example:nope'.*example:mnist-resnet-seed0"):
        resolve_model("example:nope", examples, space_mode=True)
    with pytest.raises(DemoError, match="empty"):
        resolve_model("  ", examples, space_mode=False)
    with pytest.raises(DemoError, match="neither an existing local folder nor a Hub model id"):
        resolve_model("not a model!", examples, space_mode=False)
    with pytest.raises(DemoError, match="is not a Hub model id"):
        resolve_model("not a model!", examples, space_mode=True)
    with pytest.raises(DemoError, match="not a Hub dataset id"):
        resolve_dataset("bad dataset?", examples, space_mode=True)


def test_request_limits(examples):
    limits = DemoLimits(max_models=3, max_eval_samples=100, max_calibration_samples=50, max_interpolation_points=5)

    def config(**kw):
        return build_config(FusionRequest(**{"models": (SEED0, SEED1), "evaluation_samples": 100,
                                             "calibration_samples": 50, "interpolation_points": 5, **kw}),
                            examples, limits, space_mode=True)

    cfg, names, calibration = config()
    assert cfg.fusion_parameters.alignment == "activations" and cfg.calibration.num_samples == 50
    assert cfg.evaluation.num_samples == 100 and names[cfg.models[0].model] == SEED0
    with pytest.raises(DemoError, match="at least two models"):
        config(models=(SEED0,))
    with pytest.raises(DemoError, match=r"4 models is more than this demo fuses at once \(3\)"):
        config(models=(SEED0, SEED1, "org/a", "org/b"))
    with pytest.raises(DemoError, match="listed twice"):
        config(models=(SEED0, SEED0))
    with pytest.raises(DemoError, match=r"evaluation samples is 101, more than this demo allows \(100\)"):
        config(evaluation_samples=101)
    with pytest.raises(DemoError, match=r"calibration samples is 51, more than this demo allows \(50\)"):
        config(calibration_samples=51)
    with pytest.raises(DemoError, match="interpolation points is 6"):
        config(interpolation_points=6)
    with pytest.raises(DemoError, match="unknown solver 'magic'"):
        config(solver="magic")
    with pytest.raises(DemoError, match="split"):
        config(evaluation_split="../../etc")
    with pytest.raises(DemoError, match="whole number"):
        check_count("ten", 10, "the batch size")


def test_model_size_is_checked_before_loading(examples, store, monkeypatch):
    folder = EXAMPLES / "models" / "mnist-resnet-seed0"
    from hf_otfusion.sources import load_model

    assert safetensors_values(folder) == state_values(load_model(str(folder)).model)
    assert precheck_size(str(folder)) == safetensors_values(folder)

    def no_loading(*args, **kwargs):
        raise AssertionError("an oversized model must be refused before it is loaded")

    monkeypatch.setattr("hf_otfusion.demo.core.load_parents", no_loading)
    with pytest.raises(DemoError, match=r"example:mnist-resnet-seed0 has 0\.\d\d M parameters; this demo allows at "
                                        r"most 0\.10 M per model"):
        run_demo_fusion(FusionRequest(models=(SEED0, SEED1), **SMALL), limits=DemoLimits(max_params=100_000),
                        examples=examples, store=store, space_mode=True)


def test_unknown_and_mismatched_models(examples, store, tmp_path):
    import timm

    with pytest.raises(FusionError, match="not found|cannot download|Hub cannot be reached"):
        run_demo_fusion(FusionRequest(models=(SEED0, "nobody/no-such-model"), **SMALL), limits=TEST_LIMITS,
                        examples=examples, store=store, space_mode=True)
    other = tmp_path / "effnet"
    timm.models.save_for_hf(timm.create_model("test_efficientnet", in_chans=1, num_classes=10), str(other),
                            safe_serialization=True)
    with pytest.raises(FusionError, match="cannot merge different architectures"):
        run_demo_fusion(FusionRequest(models=(SEED0, str(other)), **SMALL), limits=TEST_LIMITS, examples=examples,
                        store=store, space_mode=False)


# ----------------------------------------------------------------------------------------------------------
# Logic: one fusion and its explanations


def test_fusion_table_curve_and_card(fused):
    kinds = [r.kind for r in fused.rows]
    assert kinds == ["parent", "parent", "vanilla", "ensemble", "fused"]
    assert [r.name for r in fused.rows[:2]] == [SEED0, SEED1]
    table = fused.table()
    assert [row[1] for row in table] == ["parent", "parent", "vanilla average", "ensemble", "OT fusion"]
    assert all(0 <= row[2] <= 100 and row[3] >= 0 for row in table)
    assert min(r.accuracy for r in fused.rows if r.kind == "parent") > 0.9
    # why it works: halfway between the two models, aligned weights keep most of the accuracy, vanilla ones do not
    curve = fused.curve
    assert curve.t == (0.0, 0.25, 0.5, 0.75, 1.0) and curve.norms_recomputed
    assert curve.aligned[0] == curve.vanilla[0]
    assert curve.at(0.5) > 0.8 > 0.4 > curve.at(0.5, "vanilla")
    # with two equally weighted parents the fused model is the aligned midpoint, with the same repair
    assert fused.repair == "reset_bn"
    assert next(r.accuracy for r in fused.rows if r.kind == "fused") == pytest.approx(curve.at(0.5), abs=0.011)
    # the written output: a loadable timm folder with its card, and a zip of it
    assert {p.name for p in fused.folder.iterdir()} >= {"config.json", "model.safetensors", "README.md", "plan.json"}
    assert "| OT fusion |" in fused.card and "optimal-transport" in fused.card
    with zipfile.ZipFile(fused.archive) as zf:
        assert "fused-model/model.safetensors" in zf.namelist()


def test_transport_maps_are_permutations(fused):
    assert fused.pair == (SEED0, SEED1)
    for name, coupling in fused.couplings.items():
        n = coupling.shape[0]
        assert coupling.shape == (n, n), name  # equal widths
        assert ((coupling > 0).sum(axis=1) == 1).all() and ((coupling > 0).sum(axis=0) == 1).all(), name
    name = next(iter(fused.couplings))
    fig = transport_map_figure(fused.couplings[name], name, fused.pair)
    image = fig.axes[0].images[0].get_array()
    assert image.shape == fused.couplings[name].shape
    assert float(image.max()) == pytest.approx(1.0)  # a permutation: mass 1 per row after scaling
    assert name in fig.axes[0].get_title()


def test_interpolation_figure():
    curve = InterpolationCurve(t=(0.0, 0.5, 1.0), aligned=(0.9, 0.8, 0.95), vanilla=(0.9, 0.1, 0.95))
    fig = interpolation_figure(curve, ("a", "b"), fused=0.7)
    ax = fig.axes[0]
    assert [list(line.get_ydata()) for line in ax.lines[:2]] == [[90.0, 80.0, 95.0], [90.0, 10.0, 95.0]]
    assert len(ax.lines) == 3  # aligned, vanilla, fused level
    no_vanilla = interpolation_figure(InterpolationCurve(t=(0.0, 1.0), aligned=(0.9, 0.9), vanilla=None), ("a", "b"))
    assert len(no_vanilla.axes[0].lines) == 1


def test_without_repair_the_path_keeps_interpolated_statistics(examples, store):
    result = run_demo_fusion(FusionRequest(models=(SEED0, SEED1), alignment="weights", repair="none", **SMALL),
                             limits=TEST_LIMITS, examples=examples, store=store)
    assert result.repair == "none" and result.batchnorm and not result.curve.norms_recomputed
    fused_row = next(r for r in result.rows if r.kind == "fused")
    assert fused_row.accuracy == pytest.approx(result.curve.at(0.5), abs=0.011)  # the fused pair is the midpoint
    assert "repair: none" in result.card  # the config as run, in the card


def test_timeout_stops_a_fusion_with_a_message():
    steps = []

    def cooperative(report, check):
        for i in range(1000):
            report(i / 1000, f"step {i}")
            check(f"step {i}")
            steps.append(i)
            time.sleep(0.01)
        return "finished"

    start = time.monotonic()
    with pytest.raises(DemoTimeout, match=r"longer than this demo's limit of 0.3 s and was stopped \(while step"):
        run_with_timeout(cooperative, 0.3)
    assert time.monotonic() - start < 2.0
    time.sleep(0.1)
    stopped_at = len(steps)
    time.sleep(0.2)
    assert len(steps) == stopped_at < 1000  # the worker really stopped

    def stubborn(report, check):  # never checks: interrupted between Python instructions
        while True:
            sum(range(1000))

    with pytest.raises(DemoTimeout):
        run_with_timeout(stubborn, 0.3)
    deadline = time.monotonic() + 5
    while any(t.name == "hf-otfusion-demo-fusion" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "hf-otfusion-demo-fusion" for t in threading.enumerate())
    # the next job runs normally
    assert run_with_timeout(lambda report, check: 42, 5) == 42
    with pytest.raises(DemoError, match="boom"):
        run_with_timeout(lambda report, check: (_ for _ in ()).throw(DemoError("boom")), 5)


# ----------------------------------------------------------------------------------------------------------
# The app, served on 127.0.0.1 and driven through gradio_client


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("app-outputs")


@pytest.fixture(scope="module")
def app_url(app_outputs):
    """The demo in Space mode (as a Space runs it), on a free port of 127.0.0.1, in a background thread."""
    from hf_otfusion.demo import build_app

    demo = build_app(space_mode=True, limits=TEST_LIMITS, examples_dir=EXAMPLES, output_dir=app_outputs)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                show_error=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def _fuse_args(models=(SEED0, SEED1), alignment="activations"):
    return dict(models=list(models), alignment=alignment, solver="emd", reg=0.05, marginals="uniform",
                dataset="example:mnist", evaluation_split="test", evaluation_samples=200, calibration_split="train",
                calibration_samples=200, points=5, repair="reset_bn")


def test_client_fuses_the_examples_and_pushes(app_url, app_outputs, hub_server, capfd, caplog):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    assert {"/fuse", "/transport_map", "/push"} <= set(client.view_api(return_format="dict")["named_endpoints"])
    status, table, curve, space, transport_map, card, archive = client.predict(**_fuse_args(), api_name="/fuse")
    assert status.startswith("**Done**")
    assert table["headers"] == ["model", "role", "accuracy (%)", "loss", "perplexity"]
    rows = {row[1]: row for row in table["data"]}
    assert [row[0] for row in table["data"] if row[1] == "parent"] == [SEED0, SEED1]
    assert set(rows) == {"parent", "vanilla average", "ensemble", "OT fusion"}
    for row in table["data"]:
        assert isinstance(row[2], (int, float)) and 0 <= row[2] <= 100 and isinstance(row[3], (int, float))
        assert row[4] is None  # perplexity: language models only
    assert rows["ensemble"][2] > 90 and rows["vanilla average"][2] < 50
    for plot in (curve, transport_map):
        assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/png;base64,")
    assert space["value"] and space["value"] in [c[0] for c in space["choices"]]
    assert "| OT fusion |" in card and Path(archive).suffix == ".zip"
    # another space's transport map, from the session's state
    other_space = space["choices"][-1][0]
    picture = client.predict(other_space, api_name="/transport_map")
    assert picture["plot"].startswith("data:image/png;base64,")

    # push with the user's token: used for this push only, never echoed back, stored or logged
    hub_server.write_tokens = frozenset({SECRET})
    message, token_box = client.predict("me/fused-demo", SECRET, True, api_name="/push")
    assert "Pushed to" in message and "me/fused-demo" in message and token_box == ""
    assert hub_server.repo("me/fused-demo").private
    pushed = hub_server.list_files("me/fused-demo")
    assert {"model.safetensors", "README.md", "config.json"} <= set(pushed)
    assert "hf-hub:me/fused-demo" in hub_server.file_bytes("me/fused-demo", "README.md").decode()
    out, err = capfd.readouterr()
    assert SECRET not in out + err + caplog.text + message
    written = [p for p in app_outputs.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in written)
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]


def test_client_gets_clear_errors(app_url):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app_url, verbose=False)
    with pytest.raises(AppError, match="does not read local files"):
        client.predict(**_fuse_args(models=(SEED0, "/etc/passwd")), api_name="/fuse")
    with pytest.raises(AppError, match="at least two models"):
        client.predict(**_fuse_args(models=(SEED0,)), api_name="/fuse")
    with pytest.raises(AppError, match="greater than maximum value 200|more than this demo allows"):
        client.predict(**{**_fuse_args(), "evaluation_samples": 10_000}, api_name="/fuse")
    with pytest.raises(AppError, match="fuse some models first"):
        client.predict("me/x", SECRET, True, api_name="/push")


# ----------------------------------------------------------------------------------------------------------
# A person's view: headless Chromium clicks Fuse and sees the result


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium): "
                                                   "apt-get install chromium")
def test_browser_shows_the_result(app_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    shot = tmp_path / "demo.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(app_url, wait_until="load", timeout=60_000)
            page.wait_for_selector("#fuse-button", state="visible", timeout=60_000)
            page.click("#fuse-button")
            page.wait_for_selector("#status >> text=Done", timeout=180_000)
            page.wait_for_selector("#curve img, #curve canvas", timeout=30_000)
            page.wait_for_selector("#transport-map img, #transport-map canvas", timeout=30_000)
            table = page.inner_text("#table")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    for text in (SEED0, SEED1, "vanilla average", "ensemble", "OT fusion"):
        assert text in table
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 1400 and height >= 1000 and len(data) > 50_000


def test_app_keeps_no_run_history_and_times_out_cleanly(app_url, tmp_path):
    """No run history (it would keep inputs such as a token in the browser); a fusion past the limit is stopped."""
    import urllib.request

    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from hf_otfusion.demo import build_app

    with urllib.request.urlopen(app_url + "config", timeout=30) as answer:
        assert json.loads(answer.read())["run_history"] is False
    demo = build_app(space_mode=True, limits=DemoLimits(timeout_s=0.5), examples_dir=EXAMPLES, output_dir=tmp_path)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        start = time.monotonic()
        with pytest.raises(AppError, match="longer than this demo's limit of 0.5 s and was stopped"):
            client.predict(**_fuse_args(), api_name="/fuse")
        assert time.monotonic() - start < 30
    finally:
        demo.close()
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing half-written was left behind


# ----------------------------------------------------------------------------------------------------------
# The Space folder generator


def test_make_space_writes_a_valid_space(tmp_path):
    import gradio
    import yaml
    from huggingface_hub import SpaceCard

    out = tmp_path / "space"
    proc = subprocess.run([sys.executable, "scripts/make_space.py", str(out), "--model", "timm/resnet18.a1_in1k"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hf upload" in proc.stdout
    text = (out / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(text.split("---\n")[1])
    card = SpaceCard.load(out / "README.md")
    for meta in (front, card.data.to_dict()):
        assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__
        assert meta["app_file"] == "app.py" and meta["models"] == ["timm/resnet18.a1_in1k"]
        assert 0 < len(meta["short_description"]) <= 60
        assert meta["title"] and meta["emoji"] and meta["colorFrom"] and meta["colorTo"]
        assert meta["license"] == "apache-2.0"
    requirements = (out / "requirements.txt").read_text().splitlines()
    assert any(r.startswith("torch") for r in requirements) and any(r.startswith("matplotlib") for r in requirements)
    assert not any(r.startswith("gradio") for r in requirements)
    for path in ("app.py", "hf_otfusion/__init__.py", "hf_otfusion/demo/app.py", "hf_otfusion/model_cards/otfusion.md",
                 "examples/models/mnist-resnet-seed0/model.safetensors", "examples/data/mnist/test.parquet"):
        assert (out / path).is_file(), path
    assert not list(out.rglob("__pycache__"))
    # app.py imports (building the app, not serving it), with the package copied into the Space folder
    env = {**os.environ, "SPACE_ID": "me/otfusion-demo", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": ""}
    code = ("import json, app, hf_otfusion, gradio; "
            "print(json.dumps({'package': hf_otfusion.__file__, 'blocks': isinstance(app.demo, gradio.Blocks)}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=out, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["blocks"] and Path(result["package"]).resolve().is_relative_to(out.resolve())
    # refuses to overwrite without --overwrite
    again = subprocess.run([sys.executable, "scripts/make_space.py", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode != 0 and "--overwrite" in again.stderr


# ----------------------------------------------------------------------------------------------------------
# The CLI command


def test_cli_demo_command(monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from hf_otfusion.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["demo", "--help"])
    assert result.exit_code == 0 and "--share" in result.output and "--space" in result.output
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 1
    assert "pip install 'hf-otfusion[demo]'" in result.output + getattr(result, "stderr", "")

    launched = {}
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr("hf_otfusion.demo.app.launch", lambda *a, **k: launched.update(args=a, kwargs=k))
    result = runner.invoke(app, ["demo", "--port", "7999", "--space"])
    assert result.exit_code == 0, result.output
    assert launched["args"] == ("127.0.0.1", 7999) and launched["kwargs"]["space_mode"] is True
    assert launched["kwargs"]["share"] is False


def test_base64_png_helper_is_a_png(fused):
    """The PNG the app sends for a plot decodes (what the browser shows)."""
    import io

    from gradio.processing_utils import encode_plot_to_base64

    fig = interpolation_figure(fused.curve, fused.pair)
    encoded = encode_plot_to_base64(fig, "png")
    raw = base64.b64decode(encoded.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(io.BytesIO(raw).getvalue()) > 10_000


def test_demo_fuses_two_trained_causal_lms(tmp_path, examples, store):
    """Language models in the demo: the table gives loss and perplexity (no accuracy) and the path is token loss."""
    from hf_otfusion.config import DatasetConfig
    from hf_otfusion.data import load_split
    from hf_otfusion.testing import stdlib_text_dataset, tiny_llama

    data = stdlib_text_dataset(tmp_path / "text", length=48, num_train=96, num_test=32)
    train = list(load_split(DatasetConfig(dataset=str(data), split="train"))["text"])
    parents = [str(tiny_llama(tmp_path / f"llama-seed{s}", seed=s, hidden=32, kv_heads=2, train_on=train,
                              steps=100)) for s in (0, 1)]
    result = run_demo_fusion(FusionRequest(models=tuple(parents), dataset=str(data), evaluation_split="test",
                                           calibration_split="train", repair="none", batch_size=16, **SMALL),
                             limits=TEST_LIMITS, examples=examples, store=store)
    table = result.table()
    assert [row[1] for row in table] == ["parent", "parent", "vanilla average", "ensemble", "OT fusion"]
    assert all(row[2] is None and row[3] > 0 and row[4] == pytest.approx(math.exp(row[3]), rel=1e-3)
               for row in table)
    loss = {row[1]: row[3] for row in table}
    assert loss["OT fusion"] < loss["vanilla average"]
    curve = result.curve
    assert curve.metric == "loss" and curve.aligned[0] == curve.vanilla[0]
    assert curve.at(0.5) < curve.at(0.5, "vanilla")  # aligned midpoints keep more of the parents than vanilla ones
    fig = interpolation_figure(curve, result.pair, loss["OT fusion"])
    assert fig.axes[0].get_ylabel() == "token loss (nats)"
    assert list(fig.axes[0].lines[0].get_ydata()) == list(curve.aligned)  # losses as they are, not in percent
    assert {p.name for p in result.folder.iterdir()} >= {"config.json", "model.safetensors", "README.md"}
