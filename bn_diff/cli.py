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

from .errors import BnDiffError, ExitCode

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


class Channels(str, Enum):
    auto = "auto"
    all = "all"


_state: dict[str, bool] = {"traceback": False}

# --- shared options ---------------------------------------------------------------------------
ModelArg = Annotated[Path, typer.Argument(help="Model: a pickled nn.Module (needs --trust), or a "
                                          "state_dict .pt/.pth/.safetensors with --arch.",
                                          readable=False)]  # load.py says why, with exit 3
TrustOpt = Annotated[bool, typer.Option("--trust", help="Allow unpickling a full nn.Module "
                                        "(this can run code from the file).")]
ArchOpt = Annotated[str | None, typer.Option("--arch", metavar="MOD:FN",
                    help="Factory that builds the model for a state_dict, e.g. pkg.models:resnet.")]
ImportOpt = Annotated[list[str] | None, typer.Option("--import", metavar="MODULE",
                      help="Import MODULE first (classes of a trusted pickle). Repeatable.")]
PathOpt = Annotated[list[Path] | None, typer.Option("--pythonpath", metavar="DIR",
                    help="Add DIR to sys.path for --arch / --import. Repeatable.")]
NoColorOpt = Annotated[bool, typer.Option("--no-color", help="No colour (also: NO_COLOR, non-TTY).")]
TracebackOpt = Annotated[bool, typer.Option("--traceback", help="Show the traceback of errors too.")]


def _fail(err: BnDiffError) -> NoReturn:
    from .render.console import make_console, render_error

    render_error(make_console(file=sys.stderr), err.message, err.hint)
    raise typer.Exit(int(err.exit_code))


@app.command()
def run(
    model: ModelArg,
    input: Annotated[Path | None, typer.Argument(help="Input: .pt (tensor, tuple/list/dict of "
                                                 "tensors), .npy or .npz. Omit with --input-shape.",
                                                 readable=False)]
    = None,
    mode: Annotated[Mode, typer.Option(help="as-is: each layer as saved; train/eval: the whole "
                                       "model in that mode for the analysis.")] = Mode.as_is,
    layer: Annotated[list[str] | None, typer.Option("--layer", metavar="GLOB",
                     help="Check only BN layers matching GLOB and show their channels. "
                     "Repeatable.")] = None,
    atol: Annotated[float | None, typer.Option(help="Absolute tolerance (with --rtol).")] = None,
    rtol: Annotated[float | None, typer.Option(help="Relative tolerance (with --atol).")] = None,
    json_out: Annotated[str | None, typer.Option("--json", metavar="PATH|-",
                        help="Write the report as JSON (schema bn-diff/run/v1); - for stdout.")]
    = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    trust: TrustOpt = False,
    arch: ArchOpt = None,
    import_: ImportOpt = None,
    pythonpath: PathOpt = None,
    input_shape: Annotated[str | None, typer.Option("--input-shape", metavar="N,C,H,W",
                           help="No input file: a synthetic standard-normal input of this shape.")]
    = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic input.")] = 0,
    channels: Annotated[Channels, typer.Option(help="auto: per-channel tables for mismatching "
                                               "or --layer layers; all: every channel.")]
    = Channels.auto,
    fail_on: Annotated[FailOn | None, typer.Option("--fail-on", help="Findings of this severity "
                                                    "or worse also fail the run (exit 1).")]
    = None,
    no_color: NoColorOpt = False,
    traceback_: TracebackOpt = False,
) -> None:
    """Check every BatchNorm layer of MODEL on INPUT against a float64 recompute."""
    _state["traceback"] = traceback_
    from .pipeline import run_files
    from .render.console import make_console, progress_bar, render_run

    try:
        with progress_bar(enabled=json_out != "-") as progress:
            report = run_files(
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
            )
    except BnDiffError as e:
        _fail(e)
    picked = bool(layer)
    if json_out is not None:
        from .render.jsonout import write_json

        write_json(report.to_json(), json_out)
    if json_out != "-":
        render_run(
            report,
            make_console(no_color=no_color),
            detail=(lambda _lr: True) if picked or channels is Channels.all else None,
            all_channels=channels is Channels.all,
        )
    raise typer.Exit(int(ExitCode.OK if report else ExitCode.MISMATCH))


@app.command()
def layers(
    model: ModelArg,
    trust: TrustOpt = False,
    arch: ArchOpt = None,
    import_: ImportOpt = None,
    pythonpath: PathOpt = None,
    json_out: Annotated[str | None, typer.Option("--json", metavar="PATH|-",
                        help="Write the list as JSON (schema bn-diff/layers/v1).")] = None,
    no_color: NoColorOpt = False,
    traceback_: TracebackOpt = False,
) -> None:
    """List the conv and normalization layers of MODEL with their configuration (no input needed)."""
    _state["traceback"] = traceback_
    from .load import load_model
    from .pipeline import describe_layers
    from .render.console import make_console, render_layers

    try:
        net = load_model(model, arch=arch, trust=trust, imports=import_ or (),
                         pythonpath=[str(p) for p in pythonpath or ()])
    except BnDiffError as e:
        _fail(e)
    rows = describe_layers(net)
    if json_out is not None:
        from .render.jsonout import write_json

        write_json({"schema": "bn-diff/layers/v1", "model": str(model), "layers": rows}, json_out)
    if json_out != "-":
        render_layers(rows, str(model), make_console(no_color=no_color))


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
