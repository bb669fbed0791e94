"""The `waferllm` command line. Each subcommand lives in its own module.

``main()`` is the one entry point (``waferllm`` and ``python -m waferllm``). No Python
traceback reaches a user: a mistake (any WaferLLMError) prints one ``error:`` line with
exit code 2, a usage error click's message (exit 2), Ctrl-C ``interrupted`` (130), and
anything unexpected one ``internal error`` line (exit 1; ``WAFERLLM_DEBUG=1`` shows the
traceback). Every boolean flag also has its ``--no-`` form (``--json/--no-json``).
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from waferllm.errors import WaferLLMError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="LLM inference on a simulated wafer-scale accelerator (WaferLLM design).",
)
err_console = Console(stderr=True)


def _register() -> None:
    # Imported here so each command module can register itself on `app`.
    from waferllm.interfaces import cmd_hardware  # noqa: F401
    from waferllm.interfaces import cmd_generate  # noqa: F401
    from waferllm.interfaces import cmd_bench  # noqa: F401
    from waferllm.interfaces import cmd_predict  # noqa: F401
    from waferllm.interfaces import cmd_calibrate  # noqa: F401
    from waferllm.interfaces import cmd_sweep  # noqa: F401
    from waferllm.interfaces import cmd_serve  # noqa: F401


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("waferllm")
    except Exception:  # running from a source tree that is not installed
        from waferllm import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"waferllm {version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", "-V", callback=_print_version, is_eager=True,
                                      help="Print the version and exit."),
) -> None:
    """LLM inference on a simulated wafer-scale accelerator (WaferLLM design)."""


def _conventions(group) -> None:
    """Every boolean flag of every command gets its ``--no-`` form, and no ``<bool>`` in --help."""
    def fix(cmd) -> None:
        for p in cmd.params:  # typer vendors click: duck-typed
            if getattr(p, "param_type_name", "") == "option" and getattr(p, "is_flag", False) \
                    and getattr(p, "is_bool_flag", False):
                longs = [o for o in p.opts if o.startswith("--")]
                if not p.secondary_opts and longs and not p.is_eager:
                    p.secondary_opts = [f"--no-{longs[0][2:]}"]
                p.metavar = ""
        get_help = cmd.get_help_option

        def help_option(ctx, _get=get_help):
            opt = _get(ctx)
            if opt is not None:
                opt.metavar = ""
            return opt

        cmd.get_help_option = help_option
        for sub in getattr(cmd, "commands", {}).values():
            fix(sub)

    fix(group)


def _debug() -> bool:
    return os.environ.get("WAFERLLM_DEBUG", "").strip() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes (any WaferLLMError) print one clean line, exit code 2."""
    _register()
    cmd = typer.main.get_command(app)
    _conventions(cmd)
    try:
        cmd.main(args=argv, prog_name=None if argv is None else "waferllm", standalone_mode=True)
    except WaferLLMError as exc:
        if _debug():
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False)
        return 130
    except BrokenPipeError:  # `waferllm ... | head`: the reader left; nothing more to say
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no flush error at exit
        except OSError:
            pass
        return 141
    except MemoryError:
        err_console.print("[bold red]error:[/] the host ran out of memory; try a smaller model, grid or context",
                          highlight=False)
        return 1
    except (Exception, BaseException) as exc:  # noqa: BLE001 - the last line of defence, incl. pyo3 panics
        if isinstance(exc, GeneratorExit) or _debug():
            raise
        err_console.print(f"[bold red]error:[/] internal error ({type(exc).__name__}: {escape(str(exc))}). This is a "
                          "bug in waferllm; please report it with the command line (WAFERLLM_DEBUG=1 shows the "
                          "traceback).", highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
