"""`waferllm bench serve`: load a running server and report latency and throughput.

    waferllm bench serve --base-url http://127.0.0.1:8000 --model NAME --num-prompts 64 \\
        --concurrency 8 --request-rate inf --max-tokens 32 --seed 0 [--json]

``bench`` is one command whose first argument picks the kernel sweep (gemm, gemv);
``serve`` is a different tool with its own options, so :class:`BenchCommand` hands
``bench serve ...`` to the command below instead of parsing it as a sweep.
"""

from __future__ import annotations

import json
import math
from typing import Optional

import typer
from typer.core import TyperCommand

from waferllm.errors import RequestError

_serve_app = typer.Typer(add_completion=False)


def _rate(text: str) -> float:
    t = text.strip().lower()
    if t in ("inf", "infinity"):
        return math.inf
    try:
        rate = float(t)
    except ValueError:
        rate = math.nan
    if not rate > 0 or math.isinf(rate):
        raise RequestError(f"--request-rate must be a positive number of requests per second or inf, got {text!r}")
    return rate


@_serve_app.command()
def serve(
    base_url: str = typer.Option("http://127.0.0.1:8000", "--base-url",
                                 help="The server's root (http://host:port, /v1 optional)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name to send (default: the server's first, "
                                                               "from /v1/models)."),
    num_prompts: int = typer.Option(32, "--num-prompts", help="Requests to send."),
    concurrency: int = typer.Option(8, "--concurrency", help="At most this many requests in flight."),
    request_rate: str = typer.Option("inf", "--request-rate", help="Poisson arrivals per second, or inf (all at once)."),
    max_tokens: int = typer.Option(32, "--max-tokens", help="Tokens each request generates."),
    ignore_eos: bool = typer.Option(True, "--ignore-eos/--no-ignore-eos",
                                    help="Generate --max-tokens tokens even past EOS (the same work per request)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    seed: int = typer.Option(0, "--seed", help="Seeds the prompt draw, the arrivals and the sampling."),
    prompt_file: Optional[str] = typer.Option(None, "--prompt-file",
                                              help="Prompts, one a line (default: a built-in set)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds a request may take on the client."),
    as_json: bool = typer.Option(False, "--json/--no-json", help="Print one JSON object instead of the table."),
) -> None:
    """Load an OpenAI-compatible server with streamed completions: TTFT, TPOT, ITL, E2EL
    (p50/p90/p99, mean) and throughput, host-measured and as predicted on the wafer."""
    from rich.console import Console

    from waferllm.interfaces.loadgen import run_load

    rate = _rate(request_rate)
    root = base_url.rstrip("/")
    root = root if root.endswith("/v1") else root + "/v1"
    prompts = _read_prompts(prompt_file) if prompt_file else None
    if model is None:
        model = _first_model(root)
    summary = run_load(root, model, num_prompts=num_prompts, concurrency=concurrency, request_rate=rate,
                       max_tokens=max_tokens, seed=seed, ignore_eos=ignore_eos, temperature=temperature,
                       prompts=prompts, timeout_s=timeout)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        from waferllm.interfaces.loadgen import render

        console = Console()
        render(summary, console if console.is_terminal else Console(width=160))
    if summary["completed"] == 0:
        raise RequestError(f"no request completed ({', '.join(summary['errors']) or 'no answer'})")


def _read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as exc:
        raise RequestError(f"--prompt-file {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise RequestError(f"--prompt-file {path}: not UTF-8 text") from None
    if not prompts:
        raise RequestError(f"--prompt-file {path}: no prompts in it")
    return prompts


def _first_model(root: str) -> str:
    import httpx

    try:
        data = httpx.get(root + "/models", timeout=10.0).json()
        return data["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise RequestError(f"cannot ask {root}/models for the model name ({type(exc).__name__}: {exc}); is the server "
                           "up? (or give --model)") from None


def serve_command():
    """The click command of ``bench serve`` (with the CLI's flag conventions: ``--no-`` forms)."""
    from waferllm.interfaces.cli import _conventions

    cmd = typer.main.get_command(_serve_app)
    _conventions(cmd)
    return cmd


class BenchCommand(TyperCommand):
    """``bench``: ``bench serve ...`` runs the load client, anything else the kernel sweep."""

    def make_context(self, info_name, args, parent=None, **extra):
        if args and args[0] == "serve":
            return serve_command().make_context(f"{info_name} serve", list(args[1:]), parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)
