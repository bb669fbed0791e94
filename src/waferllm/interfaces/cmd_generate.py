"""`waferllm generate (--prompt TEXT | --prompt - | --prompt-file FILE) [--engine wafer|reference] [...]`.

Everything checkable is checked before anything slow: the options (grids, dtype, KV
scheme, lengths, the wafer, the trace path) before the model is loaded, and the request
(prompt length, --max-tokens, --max-model-len against the model's context) before the
model is placed on the wafer. Options that only the wafer engine has are refused with
``--engine reference`` rather than ignored.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer

from waferllm.errors import PlacementError, RequestError, WaferLLMError
from waferllm.interfaces import algorithm_options, wafer_options
from waferllm.interfaces.cli import app

REQUEST = "Request"
SAMPLING = "Sampling (both engines)"
ENGINE = "Engine and model (both engines)"
WAFER = "Wafer engine only (--engine wafer, the default)"
OUTPUT = "Output"

#: the wafer engine's options: (parameter, flag)
WAFER_ONLY = (("wafer", "--wafer"), ("prefill_grid", "--prefill-grid"), ("decode_grid", "--decode-grid"),
              ("dtype", "--dtype"), ("kv_scheme", "--kv-scheme"), ("trace", "--trace"), ("weights", "--weights"),
              ("defect_rate", "--defect-rate"), ("defect_seed", "--defect-seed"), ("recovery", "--recovery"),
              ("numerics", "--numerics"))


def read_prompt(prompt: Optional[str], prompt_file: Optional[str]) -> str:
    """The prompt from --prompt TEXT, --prompt - (stdin) or --prompt-file FILE (- for stdin).

    Text read from stdin or a file loses one trailing newline (what ``echo`` adds)."""
    if prompt is not None and prompt_file is not None:
        raise RequestError("give the prompt once: --prompt TEXT, --prompt - (stdin) or --prompt-file FILE")
    if prompt is None and prompt_file is None:
        raise RequestError("no prompt: give --prompt TEXT, --prompt - (read stdin) or --prompt-file FILE")
    source = "-" if prompt == "-" else prompt_file
    if source is None:
        text = prompt
    elif source == "-":
        try:
            text = sys.stdin.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise RequestError(f"cannot read the prompt from stdin ({exc})") from None
    else:
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise RequestError(f"--prompt-file {source}: no such file") from None
        except IsADirectoryError:
            raise RequestError(f"--prompt-file {source}: is a directory, not a file") from None
        except UnicodeDecodeError:
            raise RequestError(f"--prompt-file {source}: not UTF-8 text") from None
        except OSError as exc:
            raise RequestError(f"--prompt-file {source}: cannot read it ({exc.strerror or exc})") from None
    if source is not None and text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    if not text:
        where = {None: "--prompt", "-": "stdin"}.get(source, f"--prompt-file {source}")
        raise RequestError(f"the prompt is empty ({where})")
    return text


def _check_trace_path(trace: str) -> None:
    """Refuse a --trace path that could not be written, before the run (losing nothing)."""
    if os.path.isdir(trace):
        raise RequestError(f"--trace {trace}: is a directory; give a file name, e.g. {os.path.join(trace, 'trace.json')}")
    parent = os.path.dirname(os.path.abspath(trace))
    existing = parent
    while not os.path.exists(existing):  # missing folders are made when the trace is written
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RequestError(f"--trace {trace}: {existing} is a file, so the trace cannot go under it")
    if not os.access(existing, os.W_OK):
        raise RequestError(f"--trace {trace}: the directory {existing} is not writable")


def with_defect_options(spec, rate, seed, recovery, seed_flag: str = "--seed"):
    """``spec`` with the defective PEs of ``--defect-rate``/``seed_flag``/``--recovery`` (each
    None when not given): a map drawn at the rate (seed 0 unless given), recovered by the
    scheme (``spare`` unless given, or the wafer file's own when it has defects); a recovery
    alone applies to the wafer file's own list."""
    from waferllm.hardware.defects import with_defect_rate
    from waferllm.hardware.plmr import DEFECT_RECOVERY

    if recovery is not None and recovery not in DEFECT_RECOVERY:
        raise RequestError(f"--recovery must be one of {', '.join(DEFECT_RECOVERY)}, got {recovery!r}")
    if rate is None:
        if seed is not None:
            raise RequestError(f"{seed_flag} draws the defect map of --defect-rate; give --defect-rate too")
        return spec if recovery is None else spec.replace(defect_recovery=recovery)
    return with_defect_rate(spec, rate, 0 if seed is None else seed, recovery or "spare", where="--defect-rate")


def _check_wafer_options(engine: str, given: dict):
    """The wafer engine's options, checked with the flags' names (no model needed). Returns the
    wafer spec and the grids ("auto" or P)."""
    from waferllm.engine.kvcache import SCHEMES
    from waferllm.engine.llm import _grid, check_grids_fit_mesh
    from waferllm.engine.run_config import NUMERICS
    from waferllm.hardware import get_wafer
    from waferllm.hardware.plmr import DTYPE_BYTES

    if engine == "reference":
        extra = [flag for name, flag in WAFER_ONLY if given[name] is not None]
        if extra:
            them = "them" if len(extra) > 1 else "it"
            try:  # offer the wafer engine only if it would take these values
                _check_wafer_options("wafer", given)
                instead = f"Drop {them}, or use --engine wafer."
            except WaferLLMError as exc:  # a bad grid, dtype, wafer or trace path
                instead = f"Drop {them} (the wafer engine would refuse {them} too: {exc})."
            raise RequestError(f"{', '.join(extra)} only appl{'y' if len(extra) > 1 else 'ies'} to the wafer engine; "
                               f"--engine reference runs the dense numpy forward on the host. {instead}")
        return None, None, None
    pg = _grid(given["prefill_grid"], "--prefill-grid")
    dg = _grid(given["decode_grid"], "--decode-grid")
    chosen = wafer_options.llm_kwargs(given)
    dtype, kv = chosen["dtype"], chosen["kv_scheme"]
    if dtype not in DTYPE_BYTES:
        raise RequestError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if kv not in SCHEMES:
        raise RequestError(f"--kv-scheme must be one of {', '.join(SCHEMES)}, got {kv!r}")
    if chosen["numerics"] not in NUMERICS:
        raise RequestError(f"--numerics must be one of {', '.join(NUMERICS)}, got {chosen['numerics']!r}")
    spec = get_wafer(given["wafer"] or "wse2")
    if given.get("weights") is not None:
        from waferllm.models.quant import WEIGHT_CHOICES

        if given["weights"] not in WEIGHT_CHOICES:
            raise RequestError(f"--weights must be one of {', '.join(WEIGHT_CHOICES)}, got {given['weights']!r}")
    spec = with_defect_options(spec, given.get("defect_rate"), given.get("defect_seed"), given.get("recovery"),
                               seed_flag="--defect-seed")
    try:
        check_grids_fit_mesh(pg, dg, spec)
    except RequestError as exc:
        raise RequestError(str(exc).replace("prefill_grid", "--prefill-grid").replace("decode_grid", "--decode-grid")) \
            from None
    if given["trace"] is not None:
        _check_trace_path(given["trace"])
    return spec, pg, dg


def _check_lengths_upfront(max_tokens: int, max_model_len: Optional[int]) -> None:
    if max_model_len is not None:
        if max_model_len < 1:
            raise RequestError(f"--max-model-len must be a positive number of tokens, got {max_model_len}")
        if max_tokens >= max_model_len:
            raise RequestError(f"--max-tokens {max_tokens} leaves no room for the prompt in --max-model-len "
                               f"{max_model_len} (it holds the prompt and the output): lower --max-tokens or raise "
                               "--max-model-len")


def _check_against_model(config, n_prompt: int, max_tokens: int, max_model_len: Optional[int]) -> int:
    """The context a request may hold (given, or prompt + --max-tokens), checked against the
    model's context; say what would fit."""
    ctx, name = config.max_position_embeddings, config.name
    if max_model_len is not None and max_model_len > ctx:
        raise RequestError(f"--max-model-len {max_model_len} is more than {name}'s context of {ctx} tokens: use at "
                           f"most --max-model-len {ctx}")
    if max_tokens >= ctx:
        raise RequestError(f"--max-tokens {max_tokens} is more than {name}'s context of {ctx} tokens, which holds the "
                           f"prompt ({n_prompt} tokens) and the output: use at most --max-tokens {max(1, ctx - n_prompt)}")
    limit = max_model_len or ctx
    knob = "--max-model-len" if max_model_len else f"{name}'s context"
    if n_prompt >= limit:
        raise RequestError(f"the prompt has {n_prompt} tokens, which leaves no room to generate in {knob} of {limit} "
                           + (f"(raise --max-model-len, up to {ctx})" if max_model_len and max_model_len < ctx
                              else "tokens: shorten the prompt"))
    if n_prompt + max_tokens > limit:
        raise RequestError(f"the prompt ({n_prompt} tokens) + --max-tokens {max_tokens} = {n_prompt + max_tokens} "
                           f"tokens do not fit {knob} of {limit}: use at most --max-tokens {limit - n_prompt}"
                           + (f", or raise --max-model-len (up to {ctx})" if max_model_len and max_model_len < ctx
                              else ""))
    return max_model_len or (n_prompt + max_tokens)


def _progress(enabled: bool):
    """A transient progress bar on stderr (only on a terminal): (context manager, callback)."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext(), None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task("loading model", total=None)

    def progress(done, total, desc):
        bar.update(task, completed=done, total=total, description=desc)

    return bar, progress


def _rewrite_for_cli(exc: PlacementError, n_prompt: int, max_tokens: int, given_mml: Optional[int]) -> PlacementError:
    """The LLM's does-not-fit advice, worded for this command when --max-model-len was not given
    (the context is then the request's own size: a shorter request is what would fit)."""
    options = exc.context.get("options")
    if given_mml is not None or not options:
        return exc
    texts = []
    for kind, text in options:
        if kind == "grid":
            grids = exc.context["fit_grids"]
            text = " with ".join(f"--{ph}-grid {g}" for ph, g in grids.items()) + (
                " (numeric runs on grids above 48 take longer on the host)" if max(grids.values()) > 48 else "")
        elif kind == "length":
            longest = exc.context["longest"]
            text = (f"a shorter request: at most {longest} tokens in all (the prompt has {n_prompt}; "
                    + (f"--max-tokens {longest - n_prompt} or fewer" if longest > n_prompt else "shorten the prompt")
                    + ") on these grids")
        elif kind == "wafer":
            text = "a wafer with more SRAM per PE (--wafer FILE)"
        texts.append(text)
    mml = n_prompt + max_tokens
    detail = exc.context.get("detail", "").replace(
        f"with max_model_len {mml}:", f"for a context of {mml} tokens (the prompt's {n_prompt} + --max-tokens {max_tokens}):")
    return PlacementError(detail + " What would fit (each checked by planning it): " + "; or ".join(texts) + ".",
                          **exc.context)


def _print_logprobs(tokenizer, out, k: int) -> None:
    """The top-k logprobs of each generated token, as a table on stdout."""
    def tok(t: int) -> str:
        try:
            return repr(tokenizer.decode([t], skip_special_tokens=False))
        except Exception:  # pragma: no cover - a tokenizer that cannot decode one id
            return f"<{t}>"

    typer.echo(f"logprobs: each generated token and its logprob, then the {k} most likely tokens at that step")
    for i, (chosen, lp) in enumerate(zip(out.token_ids, out.logprobs or [])):
        top = sorted(lp.items(), key=lambda kv: -kv[1])[:k]
        typer.echo(f"  {i:>4} {tok(chosen)} {lp.get(chosen, float('nan')):.4f}   top: "
                   + ", ".join(f"{tok(t)} {v:.4f}" for t, v in top))


@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", rich_help_panel=REQUEST,
                                         help="The prompt text (a user message with --chat); - reads it from stdin."),
    prompt_file: Optional[str] = typer.Option(None, "--prompt-file", "-f", rich_help_panel=REQUEST,
                                              help="Read the prompt from this file (- for stdin)."),
    chat: bool = typer.Option(False, "--chat/--no-chat", rich_help_panel=REQUEST,
                              help="Wrap the prompt in the model's chat template."),
    max_tokens: int = typer.Option(32, "--max-tokens", "-n", rich_help_panel=REQUEST,
                                   help="Maximum number of tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", rich_help_panel=SAMPLING, help="0 = greedy."),
    top_k: int = typer.Option(-1, "--top-k", rich_help_panel=SAMPLING, help="-1 or 0 = off."),
    top_p: float = typer.Option(1.0, "--top-p", rich_help_panel=SAMPLING, help="Nucleus sampling mass, (0, 1]."),
    seed: Optional[int] = typer.Option(None, "--seed", rich_help_panel=SAMPLING, help="Random seed for sampling (>= 0)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", rich_help_panel=SAMPLING,
                                             help="Stop string (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos/--no-ignore-eos", rich_help_panel=SAMPLING,
                                    help="Keep generating past EOS."),
    logprobs: Optional[int] = typer.Option(None, "--logprobs", rich_help_panel=OUTPUT,
                                           help="Show the top-K logprobs of each generated token (a table, or in --json)."),
    as_json: bool = typer.Option(False, "--json/--no-json", rich_help_panel=OUTPUT,
                                 help="Print one JSON object instead of streaming text."),
    engine: str = typer.Option("wafer", "--engine", "-e", rich_help_panel=ENGINE,
                               help="wafer (the simulated wafer) or reference (the dense numpy forward)."),
    model: Optional[str] = wafer_options.model(ENGINE),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", rich_help_panel=ENGINE,
                                                help="Tokens a request may hold, prompt + output (at most the model's "
                                                     "context). Default: the prompt + --max-tokens (wafer), the "
                                                     "model's context (reference)."),
    threads: Optional[int] = wafer_options.threads(ENGINE),
    wafer: Optional[str] = wafer_options.wafer(WAFER),
    prefill_grid: Optional[str] = wafer_options.grid("prefill", WAFER),
    decode_grid: Optional[str] = wafer_options.grid("decode", WAFER),
    dtype: Optional[str] = wafer_options.dtype(WAFER),
    kv_scheme: Optional[str] = wafer_options.kv_scheme(WAFER),
    trace: Optional[str] = typer.Option(None, "--trace", rich_help_panel=WAFER,
                                        help="Write a Chrome/Perfetto trace JSON of the wafer run to this file."),
    weights: Optional[str] = wafer_options.weights(WAFER),
    numerics: Optional[str] = wafer_options.numerics(WAFER),
    defect_rate: Optional[float] = typer.Option(None, "--defect-rate", rich_help_panel=WAFER,
                                                help="Fraction of defective PEs (e.g. 0.001), drawn with --defect-seed."),
    defect_seed: Optional[int] = typer.Option(None, "--defect-seed", rich_help_panel=WAFER,
                                              help="Seed of the defect map (default 0)."),
    recovery: Optional[str] = typer.Option(None, "--recovery", rich_help_panel=WAFER,
                                           help="How defects are handled: spare (hardware spare rows/columns, "
                                                "default), reroute (fault-aware placement and routing) or avoid."),
    draft_layers: Optional[int] = typer.Option(None, "--draft-layers", rich_help_panel=WAFER,
                                               help="Speculative decoding: the model's first N layers (with its LM "
                                                    "head) as the draft, on the PEs its decode leaves idle."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", rich_help_panel=WAFER,
                                              help="Speculative decoding: a draft model file or folder with the same "
                                                   "vocabulary."),
    speculative_tokens: Optional[int] = typer.Option(None, "--speculative-tokens", rich_help_panel=WAFER,
                                                     help="Drafts the model verifies per round (with a draft; "
                                                          "default 4)."),
    draft_grid: Optional[int] = typer.Option(None, "--draft-grid", rich_help_panel=WAFER,
                                             help="The draft's regions' side (default: the largest that fits, up to "
                                                  "the decode grid)."),
    draft_ahead: bool = typer.Option(False, "--draft-ahead", rich_help_panel=WAFER,
                                     help="The draft drafts the next round while the model verifies (its PEs are its "
                                          "own)."),
    acceptance_method: Optional[str] = typer.Option(None, "--acceptance-method", rich_help_panel=WAFER,
                                                    help="How sampled tokens keep drafts: rejection (the draft samples, "
                                                         "rejection sampling keeps the model's distribution; default) "
                                                         "or exact (the draft's argmax kept when the model's own sample "
                                                         "is it; a seed gives the tokens of a run without a draft, "
                                                         "up to rounding). "
                                                         "Greedy decoding is the same with either."),
    prefill_attention: str = algorithm_options.PREFILL_ATTENTION,
    decode_collectives: str = algorithm_options.DECODE_COLLECTIVES,
    gemv_ktree: str = algorithm_options.GEMV_KTREE,
    gemv_overlap: str = algorithm_options.GEMV_OVERLAP,
    beyond_paper: bool = algorithm_options.BEYOND_PAPER,
) -> None:
    """Generate text with a real model on the simulated wafer (or the dense reference).

    The prompt comes from --prompt, stdin (--prompt -) or --prompt-file. Options are
    grouped by the engine they apply to; wafer-only options with --engine reference are
    an error, not ignored.
    """
    from waferllm.engine.sampling import SamplingParams
    from waferllm.engine.threads import set_threads

    set_threads(threads)
    # 1. the options alone (no model): fast, so a mistake costs nothing
    engine = engine.strip().lower()
    if engine not in ("wafer", "reference"):
        raise RequestError(f"--engine must be wafer or reference, got {engine!r}")
    given = dict(wafer=wafer, prefill_grid=prefill_grid, decode_grid=decode_grid, dtype=dtype, kv_scheme=kv_scheme,
                 trace=trace, weights=weights, defect_rate=defect_rate, defect_seed=defect_seed, recovery=recovery,
                 numerics=numerics)
    spec, pg, dg = _check_wafer_options(engine, given)
    speculative = None
    stray = [flag for flag, v in (("--speculative-tokens", speculative_tokens), ("--draft-grid", draft_grid),
                                  ("--draft-ahead", draft_ahead or None), ("--acceptance-method", acceptance_method))
             if v is not None]
    if stray and draft_layers is None and draft_model is None:
        raise RequestError(f"{', '.join(stray)} only appl{'y' if len(stray) > 1 else 'ies'} with a draft: add "
                           "--draft-layers N or --draft-model PATH, or drop them")
    if draft_layers is not None or draft_model is not None:
        from waferllm.engine.speculative import ACCEPTANCE_METHODS, SpeculativeConfig

        if engine == "reference":
            raise RequestError("--draft-layers and --draft-model only apply to the wafer engine; drop them, or use "
                               "--engine wafer")
        method = "rejection" if acceptance_method is None else acceptance_method.strip().lower()
        if method not in ACCEPTANCE_METHODS:
            raise RequestError(f"--acceptance-method must be one of {', '.join(ACCEPTANCE_METHODS)}, "
                               f"got {acceptance_method!r}")
        speculative = SpeculativeConfig(num_speculative_tokens=4 if speculative_tokens is None else speculative_tokens,
                                        draft_layers=draft_layers, draft_ahead=draft_ahead,
                                        draft_model=draft_model, draft_grid=draft_grid, acceptance_method=method)
    _check_lengths_upfront(max_tokens, max_model_len)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            stop=stop or None, logprobs=logprobs, ignore_eos=ignore_eos)
    text = read_prompt(prompt, prompt_file)
    show = sys.stderr.isatty()

    # 2. the model (config and tokenizer; layers are read as they are placed), then the request against it
    from waferllm.models.loader import resolve_model

    bar, progress = _progress(show)
    with bar:
        if progress:
            progress(0, None, "loading model")
        loaded = resolve_model(model)
    from waferllm.engine.generate import encode_prompt

    prompt_text, ids = encode_prompt(loaded.tokenizer, text, chat, vocab_size=loaded.config.vocab_size)
    mml = _check_against_model(loaded.config, len(ids), max_tokens, max_model_len)

    # 3. the engine
    bar, progress = _progress(show)
    with bar:
        if engine == "reference":
            from waferllm.engine.reference import ReferenceEngine

            eng = ReferenceEngine(loaded, max_model_len=max_model_len, progress=progress)
        else:
            from waferllm.engine.llm import LLM

            try:
                eng = LLM(loaded, wafer=spec, prefill_grid=pg, decode_grid=dg, max_model_len=mml, progress=progress,
                          max_num_seqs=1,  # one prompt: no batch to hold
                          speculative_config=speculative,
                          **wafer_options.llm_kwargs(given),
                          **algorithm_options.chosen(prefill_attention, decode_collectives, gemv_ktree, beyond_paper,
                                                     gemv_overlap))
            except PlacementError as exc:
                raise _rewrite_for_cli(exc, len(ids), max_tokens, max_model_len) from None
    if engine == "wafer" and max_model_len is None:
        typer.echo(f"max_model_len {mml}: the prompt's {len(ids)} tokens + --max-tokens {max_tokens} "
                   "(--max-model-len reserves more)", err=True)

    # 4. the run
    if as_json:
        out = eng.generate_ids(ids, params, prompt=prompt_text)
        d = out.to_dict()
        if logprobs is None:
            d.pop("logprobs", None)
        d.pop("prompt_logprobs", None)
        typer.echo(json.dumps(d, indent=2, ensure_ascii=False, default=float))
        _write_trace(eng, trace)  # after the output: a trace that cannot be written loses nothing else
        return

    status = None
    if show:
        from rich.console import Console

        status = Console(stderr=True).status(f"prefill of {len(ids)} tokens", spinner="dots")
        status.start()

    def on_token(_tok: int, delta: str) -> None:
        nonlocal status
        if status is not None:
            status.stop()
            status = None
        if delta:
            sys.stdout.write(delta)
            sys.stdout.flush()

    try:
        out = eng.generate_ids(ids, params, on_token=on_token, prompt=prompt_text)
    finally:
        if status is not None:
            status.stop()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if logprobs is not None:
        _print_logprobs(loaded.tokenizer, out, logprobs)
    m = out.metrics
    if m.get("engine") == "wafer":
        from waferllm.interfaces.report import print_report

        print_report(m, plan=eng.plan.to_dict())
        host = m.get("host", {})
        g = eng.run.prefill_grid
        padded = -(-len(ids) // g) * g
        typer.echo(f"[wafer] {host.get('prompt_tokens')} prompt + {host.get('generated_tokens')} generated tokens, "
                   f"finish={out.finish_reason}; the prompt runs padded to {padded} tokens on the {g}x{g} prefill "
                   f"regions (TTFT grows in steps of {g} tokens); host simulation {host.get('wall_s', 0):.2f} s "
                   f"(placement {host.get('placement_wall_s', 0):.2f} s)", err=True)
        if "speculative" in m:
            sp = m["speculative"]
            rate = "-" if sp["acceptance_rate"] is None else f"{sp['acceptance_rate']:.0%}"
            reached = sp["accepted"] + sp["rejected"]  # drafts the model's own tokens were compared with
            how = "rejection sampling" if sp["sampled_drafts"] else "exact match"
            typer.echo(f"[wafer] speculative: draft {sp['draft']} on {sp['draft_grid']}x{sp['draft_grid']} regions, "
                       f"verified by {how}, {sp['rounds']} rounds, {sp['accepted']} of the {reached} drafts reached accepted ({rate}; "
                       f"{sp['drafted']} drafted), {sp['tokens_per_round'] or 0:.2f} tokens per round"
                       + (f", {sp['ahead_hits']} round{'' if sp['ahead_hits'] == 1 else 's'} drafted ahead"
                          if sp["draft_ahead"] else ""), err=True)
        _write_trace(eng, trace)
        return
    parts = [f"{m.get('prompt_tokens')} prompt + {m.get('generated_tokens')} generated tokens",
             f"finish={out.finish_reason}"]
    if m.get("prefill_tokens_per_s"):
        parts.append(f"prefill {m['prefill_tokens_per_s']:.1f} tok/s")
    if m.get("decode_tokens_per_s"):
        parts.append(f"decode {m['decode_tokens_per_s']:.1f} tok/s")
    typer.echo(f"[{m.get('engine', engine)}] " + ", ".join(parts), err=True)


def _write_trace(eng, trace: Optional[str]) -> None:
    if not trace:
        return
    try:
        os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
        eng.backend.ledger.write_trace(trace)
    except OSError as exc:
        raise RequestError(f"--trace {trace}: cannot write the trace ({exc.strerror or exc}); the run's output is "
                           "above") from None
    typer.echo(f"trace written to {trace} (open it in ui.perfetto.dev or chrome://tracing)", err=True)
