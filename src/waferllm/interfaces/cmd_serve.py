"""`waferllm serve`: an OpenAI-compatible server (completions, chat, SSE streaming, metrics).

    waferllm serve                                       # the embedded SmolLM2 on 127.0.0.1:8000
    waferllm serve --model m.gguf --wafer wse3 --port 9000 --max-num-seqs 16 --served-model-name m

The options are checked as ``generate`` checks them (the same code), then the port is
taken, then the model is loaded and placed, so a mistake costs nothing and a busy port is
found before minutes of placement. Requests are batched by the scheduler (up to
``--max-num-seqs`` decoded together, ``--max-waiting`` queued; more get a 429).
"""

from __future__ import annotations

import socket
import sys
from typing import Optional

import typer

from waferllm.errors import RequestError
from waferllm.interfaces import algorithm_options, wafer_options
from waferllm.interfaces.cli import app

SERVER = "Server"
ENGINE = "Engine and model"
WAFER = "Wafer"


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads (a busy port is a clear error)."""
    if not 0 <= port <= 65535:
        raise RequestError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RequestError(f"--host {host}: cannot resolve it ({exc.strerror or exc})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise RequestError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                           + (" (another server is there: choose another --port)" if port else "")) from None
    sock.listen(2048)  # from now on clients queue in the backlog until the server accepts them
    return sock


def _check_limits(max_num_seqs: int, max_waiting: int, request_timeout: float) -> None:
    if max_num_seqs < 1:
        raise RequestError(f"--max-num-seqs must be at least 1, got {max_num_seqs}")
    if max_waiting < 0:
        raise RequestError(f"--max-waiting must be 0 or more, got {max_waiting}")
    if not request_timeout >= 0:  # also refuses NaN
        raise RequestError(f"--request-timeout must be 0 (none) or a positive number of seconds, got {request_timeout}")


@app.command()
def serve(
    model: Optional[str] = wafer_options.model(ENGINE),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", rich_help_panel=ENGINE,
                                                    help="The model name clients send (default: --model as given, "
                                                         "or the model's name)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", rich_help_panel=ENGINE,
                                                help="Tokens a request may hold, prompt + output (default: the "
                                                     "model's context, or the longest the wafer holds)."),
    max_num_seqs: int = typer.Option(8, "--max-num-seqs", rich_help_panel=ENGINE,
                                     help="Requests decoded together in one batch (the decode KV pool is planned "
                                          "for this many contexts of --max-model-len)."),
    threads: Optional[int] = wafer_options.threads(ENGINE),
    wafer: Optional[str] = wafer_options.wafer(WAFER),
    prefill_grid: Optional[str] = wafer_options.grid("prefill", WAFER),
    decode_grid: Optional[str] = wafer_options.grid("decode", WAFER),
    dtype: Optional[str] = wafer_options.dtype(WAFER),
    kv_scheme: Optional[str] = wafer_options.kv_scheme(WAFER),
    weights: Optional[str] = wafer_options.weights(WAFER),
    numerics: Optional[str] = wafer_options.numerics(WAFER),
    host: str = typer.Option("127.0.0.1", "--host", rich_help_panel=SERVER, help="Address to listen on."),
    port: int = typer.Option(8000, "--port", rich_help_panel=SERVER, help="Port to listen on (0: any free port)."),
    max_waiting: int = typer.Option(64, "--max-waiting", rich_help_panel=SERVER,
                                    help="Requests that may wait for a batch slot; more are refused with a 429."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", rich_help_panel=SERVER,
                                          help="Seconds a request may take from arrival (then aborted: a 408, or an "
                                               "error event in a stream); 0: no limit."),
    log_level: str = typer.Option("info", "--log-level", rich_help_panel=SERVER,
                                  help="critical, error, warning, info or debug (info logs each request)."),
    prefill_attention: str = algorithm_options.PREFILL_ATTENTION,
    decode_collectives: str = algorithm_options.DECODE_COLLECTIVES,
    gemv_ktree: str = algorithm_options.GEMV_KTREE,
    gemv_overlap: str = algorithm_options.GEMV_OVERLAP,
    beyond_paper: bool = algorithm_options.BEYOND_PAPER,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, batching requests on the simulated wafer.

    Endpoints: /v1/completions, /v1/chat/completions (streaming with "stream": true),
    /v1/models, /tokenize, /detokenize, /health, /metrics. Every response's usage carries
    the predicted wafer figures (usage.wafer) and time_info.
    """
    from waferllm.engine.threads import set_threads
    from waferllm.interfaces.cmd_generate import _check_wafer_options, _progress

    # 1. the options alone, with generate's checks; then the port
    set_threads(threads)
    given = dict(wafer=wafer, prefill_grid=prefill_grid, decode_grid=decode_grid, dtype=dtype, kv_scheme=kv_scheme,
                 trace=None, weights=weights, numerics=numerics)
    spec, pg, dg = _check_wafer_options("wafer", given)
    _check_limits(max_num_seqs, max_waiting, request_timeout)
    if max_model_len is not None and max_model_len < 2:
        raise RequestError(f"--max-model-len must hold a prompt token and an output token (>= 2), got {max_model_len}")
    level = log_level.strip().lower()
    if level not in ("critical", "error", "warning", "info", "debug"):
        raise RequestError(f"--log-level must be critical, error, warning, info or debug, got {log_level!r}")
    sock = _listen(host, port)

    # 2. the model, placed (the slow part)
    try:
        from waferllm.engine.llm import LLM
        from waferllm.models.loader import resolve_model

        bar, progress = _progress(sys.stderr.isatty())
        with bar:
            if progress:
                progress(0, None, "loading model")
            loaded = resolve_model(model)
            # a model that does not fit says what would, flags included
            llm = LLM(loaded, wafer=spec, prefill_grid=pg, decode_grid=dg, max_model_len=max_model_len,
                      progress=progress, max_num_seqs=max_num_seqs, **wafer_options.llm_kwargs(given),
                      **algorithm_options.chosen(prefill_attention, decode_collectives, gemv_ktree, beyond_paper,
                                                 gemv_overlap))
        name = served_model_name or model or loaded.config.name
        run_server(llm, name, sock, max_num_seqs=max_num_seqs, max_waiting=max_waiting,
                   request_timeout_s=request_timeout or None, log_level=level)
    finally:
        sock.close()


def run_server(llm, served_model_name: str, sock: socket.socket, max_num_seqs: int = 8, max_waiting: int = 64,
               request_timeout_s: float | None = 600.0, log_level: str = "info") -> None:
    """Serve ``llm`` on a bound socket until interrupted (Ctrl-C: in-flight requests are aborted)."""
    import uvicorn

    from waferllm.interfaces.server import ServingEngine, create_app

    engine = ServingEngine(llm, max_num_seqs=max_num_seqs, max_waiting=max_waiting)
    api = create_app(engine, served_model_name, request_timeout_s=request_timeout_s)
    h, p = sock.getsockname()[:2]
    run = llm.run
    typer.echo(f"serving {served_model_name!r} on http://{h}:{p}/v1 ({llm.wafer.name}, prefill grid "
               f"{run.prefill_grid}x{run.prefill_grid}, decode grid {run.decode_grid}x{run.decode_grid}; "
               f"max_model_len {llm.max_model_len}: {llm.max_model_len_reason}; up to {max_num_seqs} requests "
               f"decoded together, {max_waiting} waiting)", err=True)
    config = uvicorn.Config(api, log_level=log_level, timeout_graceful_shutdown=5, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
