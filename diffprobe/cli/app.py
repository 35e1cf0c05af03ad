"""The Typer app, command registration helpers and the error-handling entry point."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click; its exceptions live in typer._click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import ClickException

from diffprobe.errors import DiffprobeError

# `diffprobe --help` lists the commands in pipeline order, then the tools around it. Why a list:
# registration order is the import order of the command modules, which is no order for a reader.
COMMAND_ORDER = ("plan_and_preprocess", "pretrain", "train", "predict", "evaluate",
                 "demo", "make_phantoms", "features", "sample", "ablate", "tune_timesteps",
                 "export_model", "install_model")


class OneValueGroup(TyperGroup):
    """A command group whose single-valued options refuse a second value."""

    def resolve_command(self, ctx, args):  # noqa: ANN001, ANN201  (click's signature)
        """Refuse a single-valued option given several values (``train -f 0 1``): click keeps the last
        one silently, so a user asking for two folds would get one without a word."""
        name, cmd, rest = super().resolve_command(ctx, args)
        for param in getattr(cmd, "params", []):
            if getattr(param, "multiple", True) or getattr(param, "is_flag", False) or not getattr(param, "opts", None):
                continue
            spellings = set(param.opts) | set(getattr(param, "secondary_opts", []))
            given = [a for a in rest if a.split("=", 1)[0] in spellings]
            if len(given) > 1:
                raise DiffprobeError(f"{name}: {param.opts[0]} takes one value, got {len(given)}",
                                     fix=f"give {param.opts[0]} once (run one command per value)")
        return name, cmd, rest


class PipelineOrderGroup(OneValueGroup):
    """The top-level group: commands of :data:`COMMAND_ORDER` in that order, any other after them
    (in registration order; hidden spellings such as ``plan-and-preprocess`` are not shown)."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda n: rank.get(n, len(rank)))  # stable: unknown ones keep their order


app = typer.Typer(
    name="diffprobe",
    cls=PipelineOrderGroup,
    help="3D CT segmentation from diffusion-pretrained features, configured automatically (nnU-Net style).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)

# Options that take several values nnU-Net style (``-d 1 2 3``); rewritten to repeated options.
MULTI_VALUE_OPTIONS = {"-d", "--dataset", "--t", "--timesteps", "--models", "-f", "--fold", "--n", "--levels",
                       "--rows"}


def command(name: str, example: str, **kwargs) -> Callable:
    """Register a command under its underscore name and, hidden, its hyphenated spelling."""

    def decorator(fn: Callable) -> Callable:
        epilog = f"Example:\n\n  {example}"
        app.command(name, epilog=epilog, **kwargs)(fn)
        if "_" in name:
            app.command(name.replace("_", "-"), epilog=epilog, hidden=True, **kwargs)(fn)
        return fn

    return decorator


def expand_multi_value_options(argv: list[str]) -> list[str]:
    """``-d 1 2 3`` -> ``-d 1 -d 2 -d 3`` so Typer's repeated-option lists accept nnU-Net syntax."""
    out: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg in MULTI_VALUE_OPTIONS:
            current = arg
            out.append(arg)
            continue
        if current is not None and not arg.startswith("-"):
            if out[-1] != current:
                out.append(current)
            out.append(arg)
            continue
        current = None
        out.append(arg)
    return out


INTERRUPTED = "[yellow]interrupted[/]: finished outputs are kept; rerun the same command to continue"


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (and exits with it)."""
    args = expand_multi_value_options(list(sys.argv[1:] if argv is None else argv))
    code = 0
    try:
        from diffprobe.cli import (  # noqa: F401  (registers commands; inside try: Ctrl-C while importing)
            ablate_commands,
            data_commands,
            demo_commands,
            evaluate_commands,
            features_commands,
            pretrain_commands,
            probe_commands,
        )

        result = app(args, standalone_mode=False, prog_name="diffprobe")
        code = result if isinstance(result, int) else 0
        if code == 130:  # typer turns a KeyboardInterrupt inside a command into exit code 130, silently
            console.print(INTERRUPTED)
    except DiffprobeError as e:
        # escape: the message is text, not markup ("need [low, high]" must not be eaten as a tag)
        console.print(f"[bold red]error:[/] {escape(e.format())}", highlight=False, markup=True, soft_wrap=True)
        code = 1
    except typer.Exit as e:
        code = e.exit_code
    except ClickException as e:
        e.show()
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt) as e:
        if isinstance(e.__cause__, EOFError):  # click reports an EOFError as an abort, like Ctrl-C: it is a bug
            traceback.print_exception(e.__cause__)
            console.print(f"[bold red]error:[/] {escape(type(e.__cause__).__name__)}: {escape(str(e.__cause__))} "
                          "(see the traceback above)", highlight=False)
            code = 1
        else:
            console.print(INTERRUPTED)
            code = 130
    if argv is None:  # the console script: the process ends here
        distributed = sys.modules.get("diffprobe.training.distributed")  # not imported: no process group
        if distributed is not None:  # torchrun: the group is freed before the interpreter exits
            distributed.shutdown(success=code == 0)
        sys.exit(code)
    return code
