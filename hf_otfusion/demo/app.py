"""The gradio app: pick models, fuse them, and see why aligning before averaging works.

Run it with ``hf-otfusion demo``; a Space runs ``build_app(space_mode=True)`` (see ``scripts/make_space.py``).
Event handlers have explicit API names (``/fuse``, ``/transport_map``, ``/push``), so ``gradio_client`` can drive
the app as the browser does.
"""

from __future__ import annotations

import inspect
import ipaddress
import os
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import FusionError
from ..log import get_logger
from ..registry import REPAIRS, SOLVERS
from .core import (
    ALIGNMENTS,
    DEFAULT_REPAIR,
    MARGINALS,
    TABLE_HEADERS,
    DemoError,
    DemoLimits,
    DemoResult,
    Examples,
    FusionRequest,
    OutputStore,
    choices_help,
    default_space,
    find_examples,
    rewrite_card,
    run_demo_fusion,
    run_with_timeout,
)
from .plots import interpolation_figure, transport_map_figure

log = get_logger(__name__)

TITLE = "hf-otfusion: model fusion via optimal transport"
INTRO = """\
# Model fusion via optimal transport

Two networks trained from different seeds learn similar features, **in a different order**: hidden unit 7 of one
model may do the job of unit 42 of the other. Averaging their weights as they are (*vanilla averaging*) mixes
unrelated units and destroys both. **OT fusion** ([Singh & Jaggi, NeurIPS 2020](https://arxiv.org/abs/1910.05653))
first matches the units of each model to the target's, layer by layer, with an optimal-transport map (from the
weights, or from activations on a few inputs), and only then averages. Pick models, fuse, and compare: the table,
the accuracy along the straight path between two models with and without alignment, and a transport map.
"""


def in_space() -> bool:
    """Whether the app runs on a Hugging Face Space (``SPACE_ID`` is set there)."""
    return bool(os.environ.get("SPACE_ID"))


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost``, ``127.x.x.x``, ``::1``): reachable from this machine
    only. Anything else (``0.0.0.0``, a LAN address, a host name) may be reachable from elsewhere."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reachable_from_elsewhere(host: str | None, share: bool | None) -> bool:
    """Whether gradio, launched with ``server_name=host`` and ``share``, serves other machines: a share link, a
    non-loopback address, or a Space (None: gradio's defaults, ``GRADIO_SHARE`` and ``GRADIO_SERVER_NAME``)."""
    if share is None:
        share = os.environ.get("GRADIO_SHARE", "").strip().lower() == "true"
    host = host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    return bool(share) or not is_loopback(host) or in_space()


def _limits_text(limits: DemoLimits, space_mode: bool) -> str:
    where = ("Space mode: only Hub model and dataset ids and the bundled examples are read, never the server's "
             "files; images only from their bytes; a push needs your token. " if space_mode else "")
    return (f"<small>{where}Limits: {limits.max_models} models of at most {limits.max_params / 1e6:g} M parameters, "
            f"{limits.max_eval_samples} evaluation and {limits.max_calibration_samples} calibration samples, "
            f"{limits.timeout_s:g} s per fusion, one fusion at a time (others wait in a queue).</small>")


def _user_error(err: BaseException) -> gr.Error:
    return gr.Error(str(err), duration=None, print_exception=False)


def build_app(
    *,
    space_mode: bool | None = None,
    limits: DemoLimits | None = None,
    examples_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
) -> gr.Blocks:
    """The demo as a ``gr.Blocks`` with its queue set up (launch it with ``.launch()`` or :func:`launch`).

    Args:
        space_mode: treat every input as a stranger's: Hub ids and the bundled examples only, never the server's
            files, images only from their bytes (always on when ``SPACE_ID`` is set, as on a Space). The app's
            ``launch`` refuses to serve other machines (a share link, a non-loopback address) without it.
        limits: sizes, sample counts and the time limit of one fusion (default ``DemoLimits()``).
        examples_dir: the folder with ``models/*`` and ``data/*`` (default: ``$HF_OTFUSION_EXAMPLES``,
            ``./examples``, or the repository's).
        output_dir: where fused models are written (default: a new temporary folder).
    """
    space_mode = bool(space_mode) or in_space()
    limits = limits or DemoLimits()
    examples: Examples = find_examples(examples_dir)
    store = OutputStore(output_dir)

    model_choices = examples.model_choices()
    dataset_choices = examples.dataset_choices()
    default_models = model_choices[:2]
    default_dataset = dataset_choices[0] if dataset_choices else ""

    def fuse_handler(models, alignment, solver, reg, marginals, repair, dataset, evaluation_split,
                     evaluation_samples, calibration_split, calibration_samples, points,
                     progress=gr.Progress()):  # noqa: B008
        if isinstance(models, str):
            models = [models]
        request = FusionRequest(
            models=tuple(models or ()), alignment=alignment, solver=solver, reg=reg, marginals=marginals,
            dataset=dataset or "", evaluation_split=evaluation_split, evaluation_samples=evaluation_samples,
            calibration_split=calibration_split, calibration_samples=calibration_samples,
            interpolation_points=points, repair=repair or "none",
        )

        def work(report, check) -> DemoResult:
            return run_demo_fusion(request, limits=limits, examples=examples, store=store, space_mode=space_mode,
                                   report=report, check=check)

        progress(0.0, desc="queued")
        try:
            result: DemoResult = run_with_timeout(work, limits.timeout_s,
                                                  on_progress=lambda f, text: progress(f, desc=text))
        except FusionError as err:
            raise _user_error(err) from None
        except Exception as err:  # noqa: BLE001 - the user gets one line, the log the traceback
            log.exception("fusion failed")
            raise gr.Error(f"the fusion failed unexpectedly: {type(err).__name__}: {err}", duration=None) from None
        fused = next((r.accuracy if result.curve.metric == "accuracy" else r.loss for r in result.rows
                      if r.kind == "fused"), None)
        space = default_space(result.couplings)
        status = (f"**Done** in {result.seconds:.1f} s: fused {len(result.names)} models "
                  f"({alignment} alignment, {solver}); target **{result.names[0]}**.")
        if result.batchnorm and result.repair == "none":
            status += ("\n\nThe fused model keeps the averaged BatchNorm statistics of its parents, which costs "
                       "accuracy: choose a repair to recompute them.")
        return (
            status,
            result.table(),
            interpolation_figure(result.curve, result.pair, fused if len(result.names) == 2 else None),
            gr.update(choices=list(result.couplings), value=space, interactive=True),
            transport_map_figure(result.couplings[space], space, result.pair) if space else None,
            result.card,
            str(result.archive),
            result,
        )

    def map_handler(space, result):
        if result is None or not space or space not in result.couplings:
            return None
        return transport_map_figure(result.couplings[space], space, result.pair)

    def push_handler(repo_id, token, private, result):
        # The token is used for this one push and dropped: never stored, logged or shown; the box is cleared.
        token = (token or "").strip()
        repo_id = (repo_id or "").strip()
        if result is None or not store.owns(result.folder):
            raise gr.Error("fuse some models first: there is nothing to push yet")
        if not repo_id:
            raise gr.Error("give the Hub repo to push to, e.g. your-name/fused-model")
        if not token:  # in any mode: never the host's HF_TOKEN or stored token
            raise gr.Error("paste a Hugging Face token with write access (it is used once and never stored)")
        from ..hub import PushError, push_to_hub, scrub

        try:
            rewrite_card(result, repo_id)
            url = push_to_hub(result.folder, repo_id, private=bool(private), token=token)  # this token, no other
        except (PushError, FusionError, ValueError) as err:
            raise gr.Error(scrub(str(err), [token]), duration=None) from None
        return f"Pushed to [{repo_id}]({url})", ""

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 7200)) as demo:
        result_state = gr.State(None)
        gr.Markdown(INTRO)
        gr.Markdown(_limits_text(limits, space_mode))
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                models = gr.Dropdown(
                    choices=model_choices, value=default_models, multiselect=True, allow_custom_value=True,
                    max_choices=limits.max_models, label="Models (the first one is the target)",
                    info="bundled examples, or type a Hub model id (org/name) and press Enter",
                )
                with gr.Accordion("Fusion options", open=True):
                    alignment = gr.Radio(list(ALIGNMENTS), value="activations", label="Alignment",
                                         info="weights: data-free; activations: from calibration inputs")
                    solver = gr.Radio(list(SOLVERS.names()), value="emd", label="Solver", info=choices_help(SOLVERS))
                    reg = gr.Slider(0.005, 1.0, value=0.05, step=0.005, label="Sinkhorn regularisation",
                                    visible=False)
                    marginals = gr.Radio(list(MARGINALS), value="uniform", label="Marginals")
                    repair = gr.Radio(
                        list(REPAIRS.names()), value=DEFAULT_REPAIR, label="Repair (after fusion, on the calibration "
                        "data)", info=choices_help(REPAIRS))
                with gr.Accordion("Data", open=False):
                    dataset = gr.Dropdown(choices=dataset_choices, value=default_dataset, allow_custom_value=True,
                                          label="Dataset", info="the bundled examples, or a Hub dataset id")
                    with gr.Row():
                        evaluation_split = gr.Textbox("test", label="Evaluation split")
                        evaluation_samples = gr.Slider(10, limits.max_eval_samples,
                                                       value=min(500, limits.max_eval_samples), step=10,
                                                       label="Evaluation samples")
                    with gr.Row():
                        calibration_split = gr.Textbox("train", label="Calibration split")
                        calibration_samples = gr.Slider(10, limits.max_calibration_samples,
                                                        value=min(500, limits.max_calibration_samples), step=10,
                                                        label="Calibration samples (activations, repair)")
                    n_points = limits.max_interpolation_points
                    points = gr.Slider(3, n_points, value=min(7, n_points), step=1,
                                       label="Points on the interpolation path")
                fuse_button = gr.Button("Fuse", variant="primary", elem_id="fuse-button")
            with gr.Column(scale=3, min_width=420):
                status = gr.Markdown("Pick two or more models and press **Fuse**.", elem_id="status")
                table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["str", "str", "number", "number", "number"],
                                     label="Accuracy on the evaluation data", interactive=False, elem_id="table")
                curve = gr.Plot(label="Interpolation path: vanilla vs aligned", format="png", show_label=False,
                                elem_id="curve")
                with gr.Row():
                    space = gr.Dropdown(choices=[], label="Space (a set of channels moved together)",
                                        interactive=True, scale=1)
                map_plot = gr.Plot(label="Transport map", format="png", show_label=False, elem_id="transport-map")
                with gr.Accordion("Model card (README.md of the fused model)", open=False):
                    card = gr.Code(language="markdown", label="README.md", interactive=False)
                archive = gr.File(label="Fused model (zip)", interactive=False)
                with gr.Accordion("Push the fused model to the Hub", open=False):
                    repo_id = gr.Textbox(label="Repo id", placeholder="your-name/fused-model")
                    token = gr.Textbox(label="Hub token (write access; used once, never stored)", type="password")
                    private = gr.Checkbox(label="Private repo", value=True)
                    push_button = gr.Button("Push")
                    push_status = gr.Markdown()

        solver.change(lambda s: gr.update(visible=s == "sinkhorn"), solver, reg, api_visibility="private",
                      queue=False)
        fuse_button.click(
            fuse_handler,
            inputs=[models, alignment, solver, reg, marginals, repair, dataset, evaluation_split,
                    evaluation_samples, calibration_split, calibration_samples, points],
            outputs=[status, table, curve, space, map_plot, card, archive, result_state],
            api_name="fuse", trigger_mode="once", concurrency_limit=1, concurrency_id="fusion",
        )
        space.change(map_handler, [space, result_state], map_plot, api_name="transport_map", queue=False)
        push_button.click(push_handler, [repo_id, token, private, result_state], [push_status, token],
                          api_name="push", concurrency_limit=1, concurrency_id="push")
    demo.queue(default_concurrency_limit=1, max_size=limits.max_queue)
    _guard_launch(demo, space_mode)
    return demo


def _guard_launch(demo: gr.Blocks, space_mode: bool) -> None:
    """Make ``demo.launch()`` default to ``run_history=False`` and refuse to serve other machines unless the app is
    in Space mode.

    gradio's run history keeps every input of every run (the push token included) in the browser, or in a bucket
    the user connects; a token must never be stored, so the demo turns it off however it is launched. An app built
    without Space mode reads the server's files; served by a share link or on a non-loopback address, anyone who
    reaches it could, so such a launch is an error (build it with ``space_mode=True``, or use :func:`launch`).
    """
    launch_blocks = demo.launch
    signature = inspect.signature(launch_blocks)

    def guarded_launch(*args: Any, **kwargs: Any) -> Any:
        given = {**signature.bind_partial(*args).arguments, **kwargs}
        if not space_mode and reachable_from_elsewhere(given.get("server_name"), given.get("share")):
            raise ValueError("this demo was built without Space mode, so it reads the server's files; it cannot be "
                             "served to other machines (share link, non-loopback address): build it with "
                             "space_mode=True")
        kwargs.setdefault("run_history", False)
        return launch_blocks(*args, **kwargs)

    demo.launch = guarded_launch  # type: ignore[method-assign]


def launch(
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    share: bool = False,
    space_mode: bool | None = None,
    limits: DemoLimits | None = None,
    examples_dir: str | Path | None = None,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> gr.Blocks:
    """Build the app and serve it on ``host:port`` (``port=None``: gradio's default, 7860, or the next free one).

    Space mode (see :func:`build_app`) turns on whenever the app is reachable from elsewhere: with ``share``, on a
    ``host`` other than a loopback address, or on a Space; ``space_mode=False`` is then an error.
    """
    if reachable_from_elsewhere(host, share):
        if space_mode is False:
            raise ValueError(f"a demo served to other machines (share={share}, host={host!r}) runs in Space mode; "
                             "space_mode=False is only for a loopback host without a share link")
        space_mode = True
    demo = build_app(space_mode=space_mode, limits=limits, examples_dir=examples_dir)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
                quiet=quiet, ssr_mode=False, show_error=True, footer_links=["api", "gradio"], run_history=False)
    return demo


__all__ = ["DemoError", "DemoLimits", "build_app", "in_space", "is_loopback", "launch", "reachable_from_elsewhere"]
