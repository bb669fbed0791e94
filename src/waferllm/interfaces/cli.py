"""The `waferllm` command line. Each subcommand lives in its own module."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

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


@app.callback()
def _root() -> None:
    """LLM inference on a simulated wafer-scale accelerator (WaferLLM design)."""


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes (any WaferLLMError) print one clean line, exit code 2."""
    _register()
    try:
        app(args=argv, standalone_mode=True)
    except WaferLLMError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        return 2
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
