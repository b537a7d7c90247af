"""The ``hf-otfusion`` command line: ``merge`` a YAML config into a model folder, ``align`` its parents into one
basis for other merge tools, print a model's ``plan``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from .errors import FusionError
from .output import OVERWRITE_HELP

app = typer.Typer(
    name="hf-otfusion",
    help="Model fusion via optimal transport for timm, transformers and the Hugging Face Hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
DEVICES = ("cpu", "cuda", "auto")
VERBOSE_HELP = "more on stderr: -v adds debugging records (information records show unless --quiet; warnings always)"
NO_PLAN_CACHE_HELP = ("trace the plan even when the plan cache holds it, and store nothing there (the cache: "
                      "$HF_OTFUSION_PLAN_CACHE, else HF_HOME/hf_otfusion/plans; deleting it is always safe)")


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into a one-paragraph message and exit code 1 (no traceback)."""
    try:
        yield
    except FusionError as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None


def _quiet_libraries() -> None:
    import huggingface_hub.utils
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _join_processes() -> bool:
    """Join a launcher's process group (``accelerate launch``, ``torchrun``); whether this is the main process
    (always, when not launched as one of several). Each process logs its share of the data (an information record)."""
    from .distributed import init

    rank, _ = init()
    return rank == 0


def _set_verbosity(quiet: bool, verbose: int) -> None:
    """The package's log level from ``--quiet`` / ``-v`` (see ``hf_otfusion.log``; warnings always show)."""
    from .log import set_verbosity, verbosity_of

    set_verbosity(verbosity_of(quiet, verbose))


def _check_device(device: str) -> str:
    if device not in DEVICES:
        raise typer.BadParameter(f"{device!r} is not one of {', '.join(DEVICES)}", param_hint="--device")
    return device


def registry_help() -> str:
    """One paragraph per registry (merge methods, solvers, repairs): the config field, then each unit's name and
    description, as ``hf-otfusion merge --help`` ends."""
    from rich.markup import escape

    from .registry import MERGE_METHODS, REPAIRS, SOLVERS

    sections = (("merge_method", MERGE_METHODS), ("parameters.solver", SOLVERS), ("parameters.repair", REPAIRS))
    return "\n\n".join(f"{field}: " + "; ".join(escape(f"{unit.name} ({unit.description})") for unit in registry)
                       for field, registry in sections)


class RegistryHelpCommand(TyperCommand):
    """A command whose ``--help`` ends with :func:`registry_help`, read from the registries when the help is shown
    (a unit registered after this module was imported shows too)."""

    @property  # type: ignore[override]
    def epilog(self) -> str:
        return registry_help()

    @epilog.setter
    def epilog(self, value: str | None) -> None:  # click sets it in __init__; the registries say it instead
        pass


@app.command(cls=RegistryHelpCommand)
def merge(
    config: Annotated[Path, typer.Argument(help="the merge YAML")],
    out: Annotated[Path, typer.Argument(help="the output folder (created; must be new or empty unless --overwrite)")],
    device: Annotated[str, typer.Option(help="where fusion runs: cpu, cuda or auto", callback=_check_device)] = "auto",
    push_to_hub: Annotated[str | None, typer.Option("--push-to-hub", help="push the output to this Hub repo")] = None,
    private: Annotated[bool, typer.Option(help="create the Hub repo as private")] = False,
    revision: Annotated[str | None, typer.Option(help="branch to push to")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="push as a pull request")] = False,
    overwrite: Annotated[bool, typer.Option(help=OVERWRITE_HELP)] = False,
    card: Annotated[bool, typer.Option("--card/--no-card", help="write a README.md model card")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate, load the models, print the plan; write nothing")]
    = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or summaries")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help=VERBOSE_HELP)] = 0,
    out_shard_size: Annotated[str | None, typer.Option("--out-shard-size", help="split the weights into shards of at "
                              "most this size, e.g. 5GB or 500MB (transformers outputs)")] = None,
    profile: Annotated[bool, typer.Option("--profile", help="print where the time went (load, trace, activations, "
                       "cost, solve, transport, write, ...)")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="refuse a plan that leaves movable hidden channels fixed "
                      "(as parameters.strict: true)")] = False,
    no_plan_cache: Annotated[bool, typer.Option("--no-plan-cache", help=NO_PLAN_CACHE_HELP)] = False,
    cuda: Annotated[bool, typer.Option("--cuda", help="mergekit's flag: the same as --device cuda")] = False,
    copy_tokenizer: Annotated[bool, typer.Option("--copy-tokenizer", help="mergekit's flag, always on here: the "
                              "target's tokenizer and processor files are copied into OUT")] = True,
    lazy_unpickle: Annotated[bool, typer.Option("--lazy-unpickle", help="mergekit's flag, a no-op here: merges "
                             "without data already read safetensors lazily, one tensor at a time, and .bin files "
                             "load with weights_only")] = False,
    allow_crimes: Annotated[bool, typer.Option("--allow-crimes", help="mergekit's flag: here it merges parents "
                            "whose tokenizers differ, keeping the target's (as tokenizer_source: base); "
                            "architectures must still match")] = False,
) -> None:
    """Fuse the models of a mergekit-style YAML config and write a loadable model with its card.

    mergekit's flags are accepted (--cuda, --copy-tokenizer, --lazy-unpickle, --allow-crimes, --out-shard-size);
    --help says what each does here.

    Example: hf-otfusion merge examples/mnist-otfusion.yml fused-mnist
    """
    from .config import load_config
    from .evaluate import format_table
    from .merge import check_plan, load_parents
    from .merge import merge as run
    from .plan_cache import cached_plan_of
    from .profile import profiling
    from .registry import MERGE_METHODS
    from .sources import example_input

    _set_verbosity(quiet, verbose)
    main = _join_processes()
    if quiet or not main:
        _quiet_libraries()
    if (private or revision or create_pr) and not push_to_hub:
        raise typer.BadParameter("--private, --revision and --create-pr need --push-to-hub REPO")
    say = (lambda text: None) if quiet or not main else typer.echo
    echo = typer.echo if main else (lambda text: None)
    if cuda:
        device = "cuda"
    with _user_errors():
        cfg = load_config(config)
        if allow_crimes and cfg.tokenizer_source is None:
            cfg = cfg.model_copy(update={"tokenizer_source": "base"})
        method = MERGE_METHODS.get(cfg.merge_method)
        if strict and method.aligns:
            params = cfg.fusion_parameters.model_copy(update={"strict": True})
            cfg = cfg.model_copy(update={"parameters": params})
        if push_to_hub:
            _check_repo_id(push_to_hub)
        if dry_run:
            parents = load_parents(cfg, progress=not quiet)
            _describe(parents, cfg, say)
            target = parents[cfg.target_index]
            if method.aligns:
                built = cached_plan_of(target, example_input(target), enabled=not no_plan_cache)
                echo(str(built))
                check_plan(built, cfg.fusion_parameters.strict)
            echo("dry run: the config is valid and the models load; nothing was written")
            return
        with profiling() if profile else contextlib.nullcontext() as prof:
            result = run(cfg, out, device=device, overwrite=overwrite, card=card, repo_id=push_to_hub,
                         progress=not quiet, on_loaded=lambda parents: _describe(parents, cfg, say),
                         out_shard_size=out_shard_size, plan_cache=not no_plan_cache, protect=(config,))
        if not main:  # the main process reports, writes and pushes
            return
        if result.streamed:
            calibrated = "; the calibration ran layer by layer on them" if \
                method.aligns and cfg.fusion_parameters.alignment == "activations" else ""
            say(f"streamed: each parent's tensors were read from disk as needed{calibrated}, each fused tensor "
                "written when final")
        if result.evaluation is not None:  # the result itself: printed even with --quiet
            say(f"\nevaluation on {cfg.evaluation.dataset} ({cfg.evaluation.split}):\n")
            typer.echo(format_table(result.evaluation))
        say(f"\nwrote {out}")
        if prof is not None:
            typer.echo(f"\nprofile ({cfg.merge_method}, device {device}):\n\n{prof.table()}")
        if push_to_hub:
            _push(out, push_to_hub, private=private, revision=revision, create_pr=create_pr, say=say, merged=True)


def _push(out: Path, repo_id: str, *, private: bool, revision: str | None, create_pr: bool, say, merged: bool) -> None:
    """Push ``out``; a failure says that ``out`` is intact and how to push it again without merging."""
    from .hub import PushError, push_to_hub

    try:
        url = push_to_hub(out, repo_id, private=private, revision=revision, create_pr=create_pr)
    except PushError as err:
        flags = "".join([" --private" * private, f" --revision {revision}" if revision else "",
                         " --create-pr" * create_pr])
        intact = (f"\nThe merge itself succeeded: {out} is complete and was not changed. Push it without merging "
                  f"again: hf-otfusion push {out} {repo_id}{flags}") if merged else ""
        raise FusionError(f"{err}{intact}") from None
    say(f"pushed to {url}")


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(help="an output folder of hf-otfusion merge (or any model folder)")],
    repo_id: Annotated[str, typer.Argument(help="the Hub repo to push to ('name' or 'org/name')")],
    private: Annotated[bool, typer.Option(help="create the Hub repo as private")] = False,
    revision: Annotated[str | None, typer.Option(help="branch to push to")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="push as a pull request")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or summaries")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help=VERBOSE_HELP)] = 0,
) -> None:
    """Push a folder written by ``merge`` to the Hub, without merging again (e.g. after a failed push).

    Example: hf-otfusion push fused-mnist you/mnist-fused
    """
    _set_verbosity(quiet, verbose)
    if quiet:
        _quiet_libraries()
    with _user_errors():
        _check_repo_id(repo_id)
        _push(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
              say=(lambda text: None) if quiet else typer.echo, merged=False)


@app.command()
def align(
    config: Annotated[Path, typer.Argument(help="a merge YAML (merge_method: otfusion): parents, target, parameters")],
    out: Annotated[Path, typer.Argument(help="the output folder (created; must be new or empty unless --overwrite)")],
    device: Annotated[str, typer.Option(help="where alignment runs: cpu, cuda or auto", callback=_check_device)]
    = "auto",
    overwrite: Annotated[bool, typer.Option(help=OVERWRITE_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or summaries")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help=VERBOSE_HELP)] = 0,
    no_plan_cache: Annotated[bool, typer.Option("--no-plan-cache", help=NO_PLAN_CACHE_HELP)] = False,
) -> None:
    """Transport every parent into the target's basis and write each as its own model, plus mergekit configs.

    OUT/<name>/ is each parent (the target unchanged) in its library's format with a short card;
    OUT/mergekit-linear.yml (and, for two parents, OUT/mergekit-slerp.yml) merge them next:
    mergekit-yaml OUT/mergekit-slerp.yml MERGED. Their plain average is the OT fusion of the same config.

    Example: hf-otfusion align examples/mnist-otfusion.yml aligned-mnist
    """
    from .aligned import align_notes, align_parents
    from .config import load_config

    _set_verbosity(quiet, verbose)
    main = _join_processes()
    if quiet or not main:
        _quiet_libraries()
    say = (lambda text: None) if quiet or not main else typer.echo
    with _user_errors():
        cfg = load_config(config)
        for note in align_notes(cfg) if main else ():
            typer.echo(f"note: {note}", err=True)
        result = align_parents(cfg, out, device=device, overwrite=overwrite, progress=not quiet,
                               on_loaded=lambda parents: _describe(parents, cfg, say, "align"),
                               plan_cache=not no_plan_cache, protect=(config,))
        if not main:
            return
        configs = sorted(p.name for p in out.glob("mergekit-*.yml"))
        say(f"\nwrote {out}: " + " ".join([f"{name}/" for name in result.names] + configs))
        if configs:
            say(f"next: mergekit-yaml {out / configs[-1]} MERGED")
        else:
            say(f"mergekit reads transformers checkpoints only: no mergekit config for {result.target.library} models")


def _check_repo_id(repo_id: str) -> None:
    from .sources import SourceError, parse_ref

    try:
        ref = parse_ref(repo_id)
    except SourceError:
        ref = None
    if ref is None or ref.repo_id is None or ref.revision is not None or repo_id.startswith("hf-hub:"):
        raise FusionError(f"--push-to-hub {repo_id!r} is not a Hub repo id ('name' or 'org/name')")


def _describe(parents, cfg, say, method: str | None = None) -> None:
    target = parents[cfg.target_index]
    say(f"{method or cfg.merge_method}: {len(parents)} {target.library} models ({target.architecture}), "
        f"target {target.ref.text}")


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help="a model reference: Hub id[@revision], hf-hub:name or local folder")],
    json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help=VERBOSE_HELP)] = 0,
    strict: Annotated[bool, typer.Option("--strict", help="exit with an error if the plan leaves movable hidden "
                      "channels fixed")] = False,
    no_plan_cache: Annotated[bool, typer.Option("--no-plan-cache", help=NO_PLAN_CACHE_HELP)] = False,
    maps: Annotated[bool, typer.Option("--maps", help="also check which spaces take maps other than permutations "
                    "(parameters residual: orthogonal, head_maps: orthogonal, hidden_maps: signed) and say why the "
                    "others do not")
                    ] = False,
) -> None:
    """Print the alignment plan of a model: its spaces and the tensor axes that index each.

    Example: hf-otfusion plan timm/resnet18.a1_in1k
    """
    from .plan_cache import cached_plan_of
    from .sources import example_input, load_model

    _set_verbosity(quiet, verbose)
    if quiet:
        _quiet_libraries()
    with _user_errors():
        loaded = load_model(model)
        built = cached_plan_of(loaded, example_input(loaded), enabled=not no_plan_cache)
        typer.echo(built.to_json() if json else str(built))
        if maps:
            from .folding import rotatable
            from .head_maps import find_head_maps
            from .signs import find_signs
            from .trace import export_model
            from .verify import randomised_copy

            x = example_input(loaded)
            checker = randomised_copy(loaded.model, built, x)
            found = [*rotatable(loaded.model, built, export_model(loaded.model, x), x, checker=checker).summary(),
                     *find_head_maps(loaded.model, built, x, checker=checker).summary(),
                     *find_signs(loaded.model, built, x, checker=checker).summary()]
            typer.echo("maps other than permutations (each kind checked on a randomised copy):")
            typer.echo("\n".join(f"  - {line}" for line in found) if found else "  none: no residual stream through "
                       "norms and no attention heads")
        if strict:
            built.check_strict()


@app.command("demo")
def demo_command(
    host: Annotated[str, typer.Option(help="address to serve on (0.0.0.0 to accept other machines; any "
                                      "non-loopback address turns Space mode on)")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="port (default 7860, or the next free one)")] = None,
    share: Annotated[bool, typer.Option("--share/--no-share", help="also open a public gradio share link (turns "
                                        "Space mode on)")] = False,
    space: Annotated[bool, typer.Option("--space", help="Space mode: only Hub ids and the bundled examples, never "
                                        "the server's files; images only from their bytes. On by itself with "
                                        "--share, a non-loopback --host, or on a Space (SPACE_ID set)")] = False,
    examples: Annotated[Path | None, typer.Option(help="folder of bundled examples (models/*, data/*)")] = None,
) -> None:
    """Start the gradio demo: fuse models in the browser and see why aligning before averaging works.

    Space mode turns on whenever the app is reachable from elsewhere: --share, a non-loopback --host, a Space.

    A push always needs the token typed into the app; a stored token or HF_TOKEN is never used.

    Example: hf-otfusion demo --port 7860
    """
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        typer.echo("Error: the demo needs gradio: pip install 'hf-otfusion[demo]'", err=True)
        raise typer.Exit(1)
    from .demo.app import launch

    _quiet_libraries()
    launch(host, port, share=share, space_mode=True if space else None, examples_dir=examples)


def _terminate_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the same clean-up as Ctrl-C: staging and scratch folders removed, the output untouched


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    app()


if __name__ == "__main__":
    main()
