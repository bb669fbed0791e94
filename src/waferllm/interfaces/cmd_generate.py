"""`waferllm generate --prompt TEXT [--engine wafer|reference] [--model PATH] [sampling options] [--json]`."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from waferllm.errors import RequestError
from waferllm.interfaces.cli import app


def _parse_grid(value: Optional[str]):
    """``"600"`` -> 600, ``"600x400"`` -> (600, 400), ``None`` -> None."""
    if value is None:
        return None
    v = value.strip().lower()
    try:
        if "x" in v:
            a, b = v.split("x", 1)
            return (int(a), int(b))
        return int(v)
    except ValueError:
        raise RequestError(f"bad grid {value!r}: expected P or PxQ") from None


def _build_wafer_llm(LLM, model, wafer, prefill_grid, decode_grid, dtype, kv_scheme, max_model_len, quiet):
    """Place the model on the wafer with a progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    kw = dict(model=model, wafer=wafer or "wse2", prefill_grid=prefill_grid or "auto", decode_grid=decode_grid or "auto",
              dtype=dtype, kv_scheme=kv_scheme, max_model_len=max_model_len)
    if quiet:
        return LLM(**kw)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("loading model", total=None)

        def progress(done, total, desc):
            bar.update(task, completed=done, total=total, description=desc)

        return LLM(progress=progress, **kw)


def _make_engine(name: str, model, wafer=None, prefill_grid=None, decode_grid=None, dtype="fp16", kv_scheme="shift",
                 max_model_len=None, quiet=False):
    """Build the engine named ``name`` ("wafer" or "reference").

    ``wafer`` needs ``waferllm.engine.llm``; while that layer is not importable the
    reference engine is used instead, with a one-line notice on stderr.
    """
    name = name.lower()
    if name == "wafer":
        try:
            from waferllm.engine.llm import LLM  # type: ignore[import-not-found]
        except ImportError:
            typer.echo("notice: the wafer engine is not available yet; using --engine reference", err=True)
            name = "reference"
        else:
            return _build_wafer_llm(LLM, model, wafer, prefill_grid, decode_grid, dtype, kv_scheme, max_model_len,
                                    quiet)
    if name == "reference":
        from waferllm.engine.reference import ReferenceEngine

        return ReferenceEngine(model)
    raise RequestError(f"unknown engine {name!r} (choose wafer or reference)")


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text (a user message with --chat)."),
    engine: str = typer.Option("wafer", "--engine", help="wafer (simulated wafer) or reference (dense numpy)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A .gguf file or HF directory; default: the embedded SmolLM2-135M-Instruct."),
    max_tokens: int = typer.Option(32, "--max-tokens", "-n", help="Maximum number of tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(-1, "--top-k", help="-1 or 0 = off."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, (0, 1]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    logprobs: Optional[int] = typer.Option(None, "--logprobs", help="Return the top-K logprobs of each generated token."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past EOS."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    wafer: Optional[str] = typer.Option(None, "--wafer", help="Wafer preset name or TOML/JSON file (wafer engine)."),
    prefill_grid: Optional[str] = typer.Option(None, "--prefill-grid", help="Prefill core grid: P (a PxP region) or auto (wafer engine)."),
    decode_grid: Optional[str] = typer.Option(None, "--decode-grid", help="Decode core grid: P (a PxP region) or auto (wafer engine)."),
    dtype: str = typer.Option("fp16", "--dtype", help="fp16 (as the paper) or fp32 (wafer engine)."),
    kv_scheme: str = typer.Option("shift", "--kv-scheme", help="shift (WaferLLM) or concat (baseline) KV cache."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Context reserved on the wafer (default 512)."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Write a Chrome/Perfetto trace JSON of the wafer run."),
) -> None:
    """Generate text with a real model on the simulated wafer (or the dense reference)."""
    from waferllm.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            stop=stop or None, logprobs=logprobs, ignore_eos=ignore_eos)
    pg = None if prefill_grid in (None, "auto") else _parse_grid(prefill_grid)
    dg = None if decode_grid in (None, "auto") else _parse_grid(decode_grid)
    eng = _make_engine(engine, model, wafer=wafer, prefill_grid=pg, decode_grid=dg, dtype=dtype, kv_scheme=kv_scheme,
                       max_model_len=max_model_len, quiet=as_json)

    if as_json:
        out = eng.generate(prompt, params, chat=chat)[0]
        if trace and hasattr(eng, "backend"):
            eng.backend.ledger.write_trace(trace)
        d = out.to_dict()
        if logprobs is None:
            d.pop("logprobs", None)
        d.pop("prompt_logprobs", None)
        typer.echo(json.dumps(d, indent=2, ensure_ascii=False))
        return

    def on_token(_tok: int, delta: str) -> None:
        if delta:
            sys.stdout.write(delta)
            sys.stdout.flush()

    out = eng.generate(prompt, params, chat=chat, on_token=on_token)[0]
    sys.stdout.write("\n")
    sys.stdout.flush()
    m = out.metrics
    if trace and hasattr(eng, "backend"):
        eng.backend.ledger.write_trace(trace)
    if m.get("engine") == "wafer":
        from waferllm.interfaces.report import print_report

        print_report(m, plan=eng.plan.to_dict())
        host = m.get("host", {})
        typer.echo(f"[wafer] {host.get('prompt_tokens')} prompt + {host.get('generated_tokens')} generated tokens, "
                   f"finish={out.finish_reason}; host simulation {host.get('wall_s', 0):.2f} s "
                   f"(placement {host.get('placement_wall_s', 0):.2f} s)", err=True)
        return
    parts = [f"{m.get('prompt_tokens')} prompt + {m.get('generated_tokens')} generated tokens",
             f"finish={out.finish_reason}"]
    if m.get("prefill_tokens_per_s"):
        parts.append(f"prefill {m['prefill_tokens_per_s']:.1f} tok/s")
    if m.get("decode_tokens_per_s"):
        parts.append(f"decode {m['decode_tokens_per_s']:.1f} tok/s")
    typer.echo(f"[{m.get('engine', engine)}] " + ", ".join(parts), err=True)
