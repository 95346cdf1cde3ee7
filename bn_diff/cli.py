"""The `bn-diff` command: thin typer commands, options -> one pipeline call -> one renderer -> exit code.

Exit codes: 0 all agree · 1 mismatch / failed check · 2 usage error · 3 unreadable or unsafe input ·
4 internal error (bug; traceback shown).

torch is imported only inside the commands, so that `bn-diff --help` stays instant.
"""

from __future__ import annotations

import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from .errors import BnDiffError, ExitCode, UsageError

EXIT_CODES_HELP = (
    "Exit codes: 0 all agree · 1 mismatch or failed check · 2 usage error · "
    "3 unreadable or unsafe input · 4 internal error (bug; traceback shown)."
)

app = typer.Typer(
    name="bn-diff",
    help="Make PyTorch BatchNorm transparent: recompute every BN by hand in float64 and show "
    "per channel what PyTorch did and where it disagrees.\n\n" + EXIT_CODES_HELP,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Mode(str, Enum):
    as_is = "as-is"
    train = "train"
    eval = "eval"


class FailOn(str, Enum):
    warning = "warning"
    error = "error"


class Kernel(str, Enum):
    auto = "auto"
    compiled = "compiled"
    eager = "eager"


class Channels(str, Enum):
    auto = "auto"
    all = "all"


class RefLayout(str, Enum):
    auto = "auto"
    nchw = "nchw"
    nhwc = "nhwc"


_state: dict[str, bool] = {"traceback": False}

# --- shared options ---------------------------------------------------------------------------
ModelArg = Annotated[
    Path,
    typer.Argument(
        help="Model: a pickled nn.Module (needs --trust), or a "
        "state_dict .pt/.pth/.safetensors with --arch.",
        readable=False,
    ),
]  # load.py says why, with exit 3
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust", help="Allow unpickling a full nn.Module (this can run code from the file)."
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        metavar="MOD:FN",
        help="Factory that builds the model for a state_dict, e.g. pkg.models:resnet.",
    ),
]
ImportOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--import",
        metavar="MODULE",
        help="Import MODULE first (classes of a trusted pickle). Repeatable.",
    ),
]
PathOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--pythonpath", metavar="DIR", help="Add DIR to sys.path for --arch / --import. Repeatable."
    ),
]
InputShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        metavar="N,C,H,W",
        help="No input file: a synthetic standard-normal input of this shape.",
    ),
]
SeedOpt = Annotated[int, typer.Option(help="Seed of the synthetic input.")]
NoColorOpt = Annotated[
    bool, typer.Option("--no-color", help="No colour (also: NO_COLOR, non-TTY).")
]
TracebackOpt = Annotated[
    bool, typer.Option("--traceback", help="Show the traceback of errors too.")
]


def _fail(err: BnDiffError) -> NoReturn:
    from .render.console import make_console, render_error

    render_error(make_console(file=sys.stderr), err.message, err.hint)
    raise typer.Exit(int(err.exit_code))


@app.command()
def run(
    model: ModelArg,
    input: Annotated[
        Path | None,
        typer.Argument(
            help="Input: .pt (tensor, tuple/list/dict of "
            "tensors), .npy or .npz. Omit with --input-shape.",
            readable=False,
        ),
    ] = None,
    mode: Annotated[
        Mode,
        typer.Option(
            help="as-is: each layer as saved; train/eval: the whole "
            "model in that mode for the analysis."
        ),
    ] = Mode.as_is,
    layer: Annotated[
        list[str] | None,
        typer.Option(
            "--layer",
            metavar="GLOB",
            help="Check only BN layers matching GLOB and show their channels. Repeatable.",
        ),
    ] = None,
    atol: Annotated[float | None, typer.Option(help="Absolute tolerance (with --rtol).")] = None,
    rtol: Annotated[float | None, typer.Option(help="Relative tolerance (with --atol).")] = None,
    json_out: Annotated[
        str | None,
        typer.Option(
            "--json",
            metavar="PATH|-",
            help="Write the report as JSON (schema bn-diff/run/v1); - for stdout.",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    trust: TrustOpt = False,
    arch: ArchOpt = None,
    import_: ImportOpt = None,
    pythonpath: PathOpt = None,
    input_shape: InputShapeOpt = None,
    seed: SeedOpt = 0,
    channels: Annotated[
        Channels,
        typer.Option(
            help="auto: per-channel tables for mismatching or --layer layers; all: every channel."
        ),
    ] = Channels.auto,
    fail_on: Annotated[
        FailOn | None,
        typer.Option(
            "--fail-on", help="Findings of this severity or worse also fail the run (exit 1)."
        ),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            metavar="PATH",
            dir_okay=False,
            help="Also write a self-contained HTML report (plots per layer).",
        ),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference",
            metavar="FILE",
            help="Outputs of your own implementation, keyed by layer name (.npz, .pt "
            "dict, or a directory of .npy): diagnose why they differ.",
        ),
    ] = None,
    reference_layer: Annotated[
        str | None,
        typer.Option(
            "--reference-layer",
            metavar="NAME",
            help="The layer a single-tensor --reference belongs to.",
        ),
    ] = None,
    reference_layout: Annotated[
        RefLayout,
        typer.Option(
            "--reference-layout", help="Layout of the reference tensors (auto tries both)."
        ),
    ] = RefLayout.auto,
    kernel: Annotated[
        Kernel | None,
        typer.Option(
            help="How the check runs: compiled (torch.compile, one pass per layer; seconds to "
            "compile once), eager, or auto (compiles once the work pays for it). Same verdict. "
            "[default: $BN_DIFF_KERNEL or auto]",
            show_default=False,
        ),
    ] = None,
    no_color: NoColorOpt = False,
    traceback_: TracebackOpt = False,
) -> None:
    """Check every BatchNorm layer of MODEL on INPUT against a float64 recompute."""
    _state["traceback"] = traceback_
    if kernel != Kernel.eager:  # only a run that may compile needs the cache
        from .kernels_env import private_cache

        private_cache()
    from .pipeline import run_files
    from .render.console import make_console, progress_bar, render_run

    runner: Any = run_files
    if reference is not None:
        from functools import partial

        from .diagnose_ext import run_files_with_reference

        runner = partial(
            run_files_with_reference,
            reference=reference,
            reference_layer=reference_layer,
            reference_layout=reference_layout.value,
        )
    try:
        if reference is None and reference_layer is not None:
            raise UsageError("--reference-layer needs --reference FILE")
        with progress_bar(enabled=json_out != "-") as progress:
            report = runner(
                model,
                input,
                input_shape=input_shape,
                seed=seed,
                arch=arch,
                trust=trust,
                imports=import_ or (),
                pythonpath=[str(p) for p in pythonpath or ()],
                device=device,
                mode=mode.value,
                atol=atol,
                rtol=rtol,
                layers=layer or (),
                progress=progress,
                fail_on=None if fail_on is None else fail_on.value,
                kernel=None if kernel is None else kernel.value,
            )
    except BnDiffError as e:
        _fail(e)
    from .lastrun import remember  # for `bn-diff explain` without MODEL INPUT; never fails

    remember(
        model,
        input,
        input_shape=input_shape,
        seed=seed,
        arch=arch,
        trust=trust,
        imports=import_ or (),
        pythonpath=[str(p) for p in pythonpath or ()],
        mode=mode.value,
    )
    picked = bool(layer)
    if json_out is not None:
        from .render.jsonout import write_json

        write_json(report.to_json(), json_out)
    if html is not None:
        _write_html(report, html)
    if json_out != "-":
        render_run(
            report,
            make_console(no_color=no_color),
            detail=(lambda _lr: True) if picked or channels is Channels.all else None,
            all_channels=channels is Channels.all,
        )
    raise typer.Exit(int(ExitCode.OK if report else ExitCode.MISMATCH))


def _write_html(report: Any, path: Path) -> None:
    from .render.html import write_html

    try:
        write_html(report, path)
    except BnDiffError as e:
        _fail(e)


@app.command()
def layers(
    model: ModelArg,
    trust: TrustOpt = False,
    arch: ArchOpt = None,
    import_: ImportOpt = None,
    pythonpath: PathOpt = None,
    json_out: Annotated[
        str | None,
        typer.Option(
            "--json", metavar="PATH|-", help="Write the list as JSON (schema bn-diff/layers/v1)."
        ),
    ] = None,
    no_color: NoColorOpt = False,
    traceback_: TracebackOpt = False,
) -> None:
    """List the conv and normalization layers of MODEL with their configuration (no input needed)."""
    _state["traceback"] = traceback_
    from .load import load_model
    from .pipeline import describe_layers
    from .render.console import make_console, render_layers

    try:
        net = load_model(
            model,
            arch=arch,
            trust=trust,
            imports=import_ or (),
            pythonpath=[str(p) for p in pythonpath or ()],
        )
    except BnDiffError as e:
        _fail(e)
    rows = describe_layers(net)
    if json_out is not None:
        from .render.jsonout import write_json

        write_json({"schema": "bn-diff/layers/v1", "model": str(model), "layers": rows}, json_out)
    if json_out != "-":
        render_layers(rows, str(model), make_console(no_color=no_color))


@app.command()
def explain(
    layer: Annotated[
        str,
        typer.Option(
            "--layer",
            metavar="NAME",
            help="Qualified name of the "
            "BatchNorm layer, as `bn-diff run` and `bn-diff layers` show it.",
        ),
    ],
    model: Annotated[
        Path | None,
        typer.Argument(
            help="Model, as for run. Omit MODEL and INPUT "
            "to reuse the last `bn-diff run` made in this directory."
        ),
    ] = None,
    input: Annotated[Path | None, typer.Argument(help="Input, as for run.")] = None,
    channel: Annotated[int | None, typer.Option(help="Channel to explain (default 0).")] = None,
    index: Annotated[
        str | None,
        typer.Option(
            metavar="n,c,h,...",
            help="Element to explain (default: the first element of the channel).",
        ),
    ] = None,
    mode: Annotated[
        Mode | None,
        typer.Option(help="as-is, train or eval (default: as-is, or the reused run's)."),
    ] = None,
    json_out: Annotated[
        str | None,
        typer.Option(
            "--json",
            metavar="PATH|-",
            help="Write the explanation as JSON (schema bn-diff/explain/v1); - for stdout.",
        ),
    ] = None,
    trust: TrustOpt = False,
    arch: ArchOpt = None,
    import_: ImportOpt = None,
    pythonpath: PathOpt = None,
    input_shape: InputShapeOpt = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the synthetic input (default 0).")
    ] = None,
    no_color: NoColorOpt = False,
    traceback_: TracebackOpt = False,
) -> None:
    """Show the arithmetic of one element of one BatchNorm layer, step by step, with the usual
    misreadings and what the forward did to the running statistics."""
    _state["traceback"] = traceback_
    from . import lastrun
    from .pipeline_explain import explain_files, parse_index
    from .render.console import make_console
    from .render.explain import render_explain

    try:
        idx = None if index is None else parse_index(index)
        rec, reused = lastrun.settings(
            model,
            input,
            trust=trust,
            input_shape=input_shape,
            seed=seed,
            arch=arch,
            imports=import_ or (),
            pythonpath=[str(p) for p in pythonpath or ()],
            mode=None if mode is None else mode.value,
        )
        exp = explain_files(
            Path(rec.model),
            None if rec.input is None else Path(rec.input),
            layer=layer,
            channel=channel,
            index=idx,
            mode=rec.mode,
            input_shape=rec.input_shape,
            seed=rec.seed,
            arch=rec.arch,
            trust=rec.trust,
            imports=rec.imports,
            pythonpath=rec.pythonpath,
        )
    except BnDiffError as e:
        _fail(e)
    if json_out is not None:
        from .render.jsonout import write_json

        write_json(exp.to_json(), json_out)
    if json_out != "-":
        note = f"reusing the last `bn-diff run` in this directory ({lastrun.RECORD})"
        render_explain(exp, make_console(no_color=no_color), note=note if reused else None)
    raise typer.Exit(int(ExitCode.OK if exp else ExitCode.MISMATCH))


@app.command()
def check(
    exported: Annotated[
        Path,
        typer.Argument(
            help="Exported model: .onnx, a torch.export .pt2 or a "
            "TorchScript archive (both need --trust: loading "
            "them can run code)."
        ),
    ],
    input: Annotated[
        Path | None,
        typer.Option(
            "--input",
            metavar="INPUT",
            help="Input: .pt (tensor, tuple/list of tensors), .npy or .npz.",
        ),
    ] = None,
    against: Annotated[
        Path | None,
        typer.Option(
            "--against",
            metavar="MODEL",
            help="The eager model to compare with, loaded as by `run` (a pickled "
            "module with --trust, or a state_dict with --arch).",
        ),
    ] = None,
    atol: Annotated[float | None, typer.Option(help="Absolute tolerance (with --rtol).")] = None,
    rtol: Annotated[float | None, typer.Option(help="Relative tolerance (with --atol).")] = None,
    junit: Annotated[
        Path | None,
        typer.Option("--junit", metavar="PATH", help="Write JUnit XML: one testcase per layer."),
    ] = None,
    json_out: Annotated[
        str | None,
        typer.Option(
            "--json",
            metavar="PATH|-",
            help="Write the report as JSON (schema bn-diff/check/v1); - for stdout.",
        ),
    ] = None,
    fail_on: Annotated[
        FailOn,
        typer.Option(
            "--fail-on", help="Findings of this severity or worse fail the check (exit 1)."
        ),
    ] = FailOn.error,
    trust: Annotated[
        bool,
        typer.Option(
            "--trust",
            help="Allow files whose loading can run "
            "code: a .pt2, a TorchScript archive, a pickled "
            "--against model.",
        ),
    ] = False,
    arch: ArchOpt = None,
    import_: ImportOpt = None,
    pythonpath: PathOpt = None,
    input_shape: InputShapeOpt = None,
    seed: SeedOpt = 0,
    no_color: NoColorOpt = False,
    traceback_: TracebackOpt = False,
) -> None:
    """Gate an exported model (ONNX, torch.export, TorchScript) on its BatchNorm layers: each BN
    node, or conv holding a folded BN, against the eager layer (--against) or its own float64
    recompute. For CI: --junit, --json, ::error annotations under GitHub Actions."""
    _state["traceback"] = traceback_
    from .kernels_env import private_cache  # `check --against` runs the model: it may compile

    private_cache()
    import os

    from .check_export import check_files
    from .errors import UsageError
    from .render.check import render_check
    from .render.console import make_console

    try:
        if against is None and (arch is not None or import_):
            raise UsageError(
                "--arch and --import describe the --against model", "add --against MODEL"
            )
        report = check_files(
            exported,
            input,
            against=against,
            input_shape=input_shape,
            seed=seed,
            arch=arch,
            trust=trust,
            imports=import_ or (),
            pythonpath=[str(p) for p in pythonpath or ()],
            atol=atol,
            rtol=rtol,
            fail_on=fail_on.value,
        )
        _write_reports(report, json_out, junit)
    except BnDiffError as e:
        _fail(e)
    if json_out != "-":
        # CI logs are not terminals: give the table room instead of rich's 80 columns
        wide = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120
        render_check(report, make_console(no_color=no_color, width=wide))
        if os.environ.get("GITHUB_ACTIONS") == "true":
            from .render.github import github_annotations

            for line in github_annotations(report):
                print(line)
    raise typer.Exit(int(ExitCode.OK if report else ExitCode.MISMATCH))


def _write_reports(report: Any, json_out: str | None, junit: Path | None) -> None:
    """JSON and JUnit files, each written atomically (an unwritable path is a usage error)."""
    if json_out is not None:
        from .render.jsonout import write_json

        write_json(report.to_json(), json_out)
    if junit is not None:
        from .render.junit import write_junit

        write_junit(report, junit)


def main(argv: list[str] | None = None) -> Any:
    """Entry point: user errors are one line with a hint; bugs keep their traceback (exit 4)."""
    _tolerant_streams()
    try:
        code = app(args=argv, prog_name="bn-diff", standalone_mode=False)
    except typer.Exit as e:
        return _exit(e.exit_code)
    except BnDiffError as e:
        if _state["traceback"]:
            traceback.print_exc()
        try:
            _fail(e)
        except typer.Exit as x:
            return _exit(x.exit_code)
    except Exception as e:  # the command-line parser's usage errors, then genuine bugs
        if type(e).__name__ == "Abort":
            return _exit(130)
        show = getattr(e, "show", None)
        if callable(show) and isinstance(getattr(e, "exit_code", None), int):
            show()  # a usage error of the parser: it prints "Usage: ... Error: ..."
            return _exit(int(ExitCode.USAGE))
        traceback.print_exc()
        print(
            "bn-diff: internal error (a bug in bn-diff, exit 4); please report it with the "
            "traceback above",
            file=sys.stderr,
        )
        return _exit(int(ExitCode.INTERNAL))
    return _exit(code if isinstance(code, int) else 0)


def _tolerant_streams() -> None:
    """A character the terminal's encoding lacks (an ASCII locale, a file name that is not UTF-8)
    is written as an escape instead of ending the run with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure):
            reconfigure(errors="backslashreplace")


def _exit(code: int) -> NoReturn:
    sys.stdout.flush()
    raise SystemExit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
