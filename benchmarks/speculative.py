"""Speculative decoding on the modelled wse2: accepted tokens/s with a draft on the idle PEs.

    .venv/bin/python benchmarks/speculative.py [--markdown benchmarks/RESULTS-speculative.md]
    .venv/bin/python benchmarks/speculative.py --only smollm2-sampled   # one part

1. Real prompts, real weights: SmolLM2-135M as the target (48x48 grids, fp16, fused
   numerics, greedy), its first N layers with its final norm and LM head as the draft
   (the only smaller model these weights give), on the PEs the target's decode leaves
   idle. Acceptance is measured: how often the target's greedy token is the draft's guess.
   Every speculative run's tokens are checked against the plain run's.
2. The same, sampled (temperature 0.8, several seeds): verification by exact match (the
   draft's argmax, kept when the target's own sample is it) against rejection sampling (the
   draft samples its guesses, kept with probability min(1, p/q)): how many drafts each keeps.
   Exact match gives the target's own tokens for a seed (compared; up to the verification
   pass's rounding); rejection sampling gives tokens distributed as the target's
   (tests/test_speculative.py checks the distribution).
3. Shape-only: llama3-8b (both phases on 360x360 regions, int8 weights) with a llama3.2-1b
   draft, 512 + 128 tokens, at assumed acceptance rates (a seeded draw per draft), against
   llama3-8b alone on the same grids. The draft needs PEs neither of the target's phases
   uses: with a 600x600 prefill grid, or fp16 weights, none are left for it.

The wafer figures are modelled time: each round's draft steps, the hand-offs, the
verification pass and the rollbacks, one after another (``waferllm.engine.speculative``).
"ahead": the draft drafts the next round while the target verifies (as if every draft were
taken and the target's own next token were the draft's guess, drawn at the same rate); only
its work beyond the verification's time is on the critical path.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from waferllm.engine.llm import LLM
from waferllm.engine.predict import predict_run
from waferllm.engine.run_config import RunConfig
from waferllm.engine.sampling import SamplingParams
from waferllm.engine.speculative import SpeculativeConfig, speculative_backend
from waferllm.engine.threads import set_threads
from waferllm.engine.wafer import WaferModel
from waferllm.hardware import get_wafer
from waferllm.models.presets import get_model_preset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Out  # noqa: E402

PROMPTS = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "Write a short poem about the sea.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
)
SMOL = ((None, None), (20, 2), (25, 2), (25, 4))  # (draft layers, k); None: the target alone
SMOL_SAMPLED = ((None, None), (20, 2), (25, 2), (25, 4))  # each draft with both acceptance methods
METHODS = ("exact", "rejection")
PARTS = ("llama3-8b", "smollm2", "smollm2-sampled")
# (k, acceptance, draft ahead)
EIGHT_B = ((2, 0.6, False), (2, 0.8, False), (2, 0.9, False), (4, 0.8, False), (4, 0.9, False), (4, 1.0, False),
           (2, 0.8, True), (2, 0.9, True), (4, 0.9, True), (4, 1.0, True))


def _run_smol(spec: dict | None, params: list[SamplingParams]) -> dict:
    """Every prompt with every request's params on SmolLM2 (48x48 grids), with the draft of
    ``spec`` or alone: the tokens, the modelled decode time per token after the first, and
    what speculation did, summed."""
    llm = LLM(None, prefill_grid=48, decode_grid=48, max_model_len=160, speculative_config=spec)
    outs = [llm.generate(p, sp)[0] for p in PROMPTS for sp in params]
    n = sum(len(o.token_ids) - 1 for o in outs)
    run = {"ids": [o.token_ids for o in outs], "n": n,
           "tpot": sum(o.metrics["tpot_s"] * (len(o.token_ids) - 1) for o in outs) / n}
    if spec is not None:
        s = [o.metrics["speculative"] for o in outs]
        run.update({key: sum(x[key] for x in s) for key in ("accepted", "rejected", "rounds")})
        # acceptance: of the drafts the target's tokens were compared with
        run["rate"] = run["accepted"] / (run["accepted"] + run["rejected"])
    return run


def smollm2(out: Out, tokens: int) -> None:
    out("## SmolLM2-135M with its first N layers as the draft (real prompts, greedy)")
    out()
    out(f"48x48 grids for the target, the draft on free 48x48 regions; {len(PROMPTS)} prompts, {tokens} tokens "
        "each (ignore EOS); wafer figures summed over the prompts.")
    out()
    params = [SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)]
    base, rows = None, []
    for layers, k in SMOL:
        spec = None if layers is None else {"draft_layers": layers, "num_speculative_tokens": k}
        run = _run_smol(spec, params)
        if layers is None:
            base = run
            rows.append(["target alone", "-", "-", "-", f"{1 / run['tpot']:,.0f}", "1.00x", "-"])
            continue
        rows.append([f"first {layers} layers", k, f"{run['rate']:.1%}", f"{run['n'] / run['rounds']:.2f}",
                     f"{1 / run['tpot']:,.0f}", f"{base['tpot'] / run['tpot']:.2f}x",
                     "yes" if run["ids"] == base["ids"] else "NO"])
        print(f"  draft {layers} k={k}: acceptance {run['rate']:.3f}", flush=True)
    out.table(["draft", "k", "acceptance", "tokens per round", "accepted tokens/s", "vs alone", "same tokens"], rows)
    out()


def smollm2_sampled(out: Out, tokens: int, temperature: float, seeds: int) -> None:
    out(f"## SmolLM2-135M sampled (temperature {temperature}): exact match against rejection sampling")
    out()
    out(f"As above, each prompt with {seeds} seeds, temperature {temperature} (no top-k, top-p); figures summed "
        f"over the {len(PROMPTS) * seeds} requests. exact: the draft's argmax, kept when the target's own sample is "
        "it; rejection: the draft samples its guesses (its own distribution q at the request's temperature), each "
        "kept with probability min(1, p/q), else the token is drawn from normalize(max(0, p - q)): tokens "
        "distributed as the target's own, not equal to them. 'same tokens': exact match's tokens are those of the "
        "target alone for each seed up to the verification pass's rounding: its logprobs differ from a lone decode "
        "step's by ~1e-3, so a draw within that of the edge between two tokens of the 49,152 (typically two "
        "unlikely ones) takes the other, and the request goes on from a different token.")
    out()
    params = [SamplingParams(max_tokens=tokens, temperature=temperature, seed=seed, ignore_eos=True)
              for seed in range(seeds)]
    base, rows = None, []
    for layers, k in SMOL_SAMPLED:
        if layers is None:
            base = _run_smol(None, params)
            rows.append(["target alone", "-", "-", "-", "-", f"{1 / base['tpot']:,.0f}", "1.00x", "-"])
            continue
        for method in METHODS:
            run = _run_smol({"draft_layers": layers, "num_speculative_tokens": k, "acceptance_method": method}, params)
            rows.append([f"first {layers} layers", k, method, f"{run['rate']:.1%}", f"{run['n'] / run['rounds']:.2f}",
                         f"{1 / run['tpot']:,.0f}", f"{base['tpot'] / run['tpot']:.2f}x",
                         ("yes" if run["ids"] == base["ids"] else "NO") if method == "exact" else "-"])
            print(f"  draft {layers} k={k} {method}: acceptance {run['rate']:.3f}", flush=True)
    out.table(["draft", "k", "verification", "acceptance", "tokens per round", "accepted tokens/s", "vs alone",
               "same tokens"], rows)
    out()


def llama3_8b(out: Out) -> None:
    out("## llama3-8b with a llama3.2-1b draft (shape-only, assumed acceptance)")
    out()
    out("512 + 128 tokens, fp16 activations and KV, int8 weights (GGUF Q8_0 blocks) for both models, grids 360/360 "
        "for the target (with a 600x600 prefill grid, or fp16 weights, no PEs are left for the draft); the draft on "
        "the largest grid that plans in the PEs neither of the target's phases uses. Each row's target is planned "
        "for its verification pass (k+1 rows).")
    out()
    wafer = get_wafer("wse2")
    cfg, draft = get_model_preset("llama3-8b"), get_model_preset("llama3.2-1b")
    run = RunConfig.for_request(512, 128, prefill_grid=360, decode_grid=360, weights="int8")
    base = predict_run(cfg, wafer, run, 512, 128, gpus=False, band=False)
    rows = [["target alone", "-", "-", "-", "-", f"{base['decode_tokens_per_s']:,.0f}", "1.00x",
             f"{base['tpot_s'] * 1e3:.3f}", "-"]]
    for k, a, ahead in EIGHT_B:
        target = WaferModel(cfg, None, wafer, run.replace(speculative_tokens=k), mode="dry")
        b = speculative_backend(target, SpeculativeConfig(num_speculative_tokens=k, draft_model="llama3.2-1b",
                                                          draft_ahead=ahead), draft_config=draft)
        b.run_dry(512, 128, a)
        m = b.request_metrics()
        s = m["speculative"]
        split = s["decode_s"]
        rows.append([f"llama3.2-1b on {s['draft_grid']}x{s['draft_grid']}" + (", ahead" if ahead else ""), k,
                     f"{a:.0%}",
                     f"{s['tokens_per_round']:.2f}", f"{split['draft'] / s['rounds'] * 1e3:.3f} / "
                     f"{split['verify'] / s['rounds'] * 1e3:.3f}", f"{m['decode_tokens_per_s']:,.0f}",
                     f"{m['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x", f"{m['tpot_s'] * 1e3:.3f}",
                     f"{m['e2e_tokens_per_s']:,.0f}"])
        print(f"  k={k} a={a} ahead={ahead}: {m['decode_tokens_per_s']:.0f} tok/s", flush=True)
    out.table(["draft", "k", "acceptance", "tokens per round", "draft (exposed) / verify ms per round", "accepted tokens/s",
               "vs alone", "TPOT ms", "e2e TPR"], rows)
    out()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--tokens", type=int, default=32, help="Tokens per SmolLM2 prompt.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.8, help="Of the sampled SmolLM2 part.")
    ap.add_argument("--seeds", type=int, default=2, help="Seeds per prompt in the sampled SmolLM2 part.")
    ap.add_argument("--only", choices=PARTS, default=None, help="Run this part alone.")
    args = ap.parse_args()
    set_threads(args.threads)
    out = Out()
    t0 = time.perf_counter()
    out.header("Speculative decoding", "speculative.py")
    parts = {"llama3-8b": lambda: llama3_8b(out), "smollm2": lambda: smollm2(out, args.tokens),
             "smollm2-sampled": lambda: smollm2_sampled(out, args.tokens, args.temperature, args.seeds)}
    for name in [args.only] if args.only else PARTS:
        parts[name]()
    out(f"Host time: {time.perf_counter() - t0:.0f} s (one thread).")
    out.save(args.markdown)


if __name__ == "__main__":
    main()
