"""Simulation speed: the host time the simulator takes, on both of its paths, at a stated thread count.

    .venv/bin/python benchmarks/simulation_speed.py [--threads 1] [--max-tokens 16]
        [--markdown benchmarks/RESULTS-simulation-speed.md]

Every figure is host wall time (and the process's CPU time beside it: the host is shared
with other work) at ``--threads`` BLAS threads and simulator workers
(:mod:`waferllm.engine.threads`). "Cold" is a fresh Python process (imports done, nothing
priced or planned yet: what the command line pays); "warm" is the same call again in that
process (what a sweep or a server pays).

1. Dry-run ``predict`` (shapes only), fully placed, with its low/high band: llama3-8b
   2048/128 on 600/360 grids of one WSE-2, and llama3-70b pipelined over 10 WSE-2 on the
   same grids (it needs 10); then ``--wafers auto`` for qwen2-72b (the count and layout
   searched).
2. The grid tuner (``tune_grids``) for llama3-8b 2048/128, both grids auto.
3. Time to first token of ``waferllm generate --max-tokens 8 --prompt "The wafer-scale
   engine is"`` (the embedded SmolLM2, grids tuned), from the process start to the first
   generated text on stdout, and where it went (loading, tuning, placement, prefill).
4. The numeric simulation (every PE's tiles real, fp16) against the dense numpy reference
   (``ReferenceModel``, fp32): host seconds per prompt token and per generated token on the
   grids ``generate`` picks, and on ``--grids``, with fused numerics (the default) and with
   every layer primitive by primitive (``numerics="mesh"``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Out, code_version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The wafer-scale engine is"
LONG_PROMPT = ("The wafer-scale engine is a single silicon wafer holding hundreds of thousands of cores, "
               "each with its own small memory, connected by a two-dimensional mesh. Large language models")

# Run in a fresh interpreter: the calls, timed cold then warm; prints one JSON line.
_PREDICT = """
import json, sys, time
from waferllm.engine.threads import set_threads
set_threads({threads})
from waferllm.engine.predict import predict, predict_cluster
from waferllm.engine.run_config import RunConfig
from waferllm.engine.tuner import tune_grids
from waferllm.hardware import get_wafer
from waferllm.hardware.cluster import cluster_for
from waferllm.models.presets import get_model_preset
w = get_wafer("wse2")
def call():
    {call}
out = []
for _ in range(2):
    t, c = time.perf_counter(), time.process_time()
    m = call()
    out.append([time.perf_counter() - t, time.process_time() - c])
print(json.dumps({{"times": out, "m": m}}))
"""

CALLS = {
    "llama3-8b": 'return predict(get_model_preset("llama3-8b"), w, 2048, 128, 600, 360, gpus=False)["ttft_s"]',
    "llama3-70b": ('return predict_cluster(get_model_preset("llama3-70b"), cluster_for(w), RunConfig.for_request('
                   '2048, 128, prefill_grid=600, decode_grid=360), 2048, 128, wafers=10, gpus=False)["ttft_s"]'),
    "qwen2-72b": ('m = predict_cluster(get_model_preset("qwen2-72b"), cluster_for(w), RunConfig.for_request('
                  '2048, 128, prefill_grid=600, decode_grid=360), 2048, 128, wafers="auto", gpus=False); '
                  'return [m["cluster_search"]["chosen"]["wafers"], len(m["cluster_search"]["options"])]'),
    "tuner": ('r = tune_grids(get_model_preset("llama3-8b"), w, RunConfig.for_request(2048, 128), 2048, 128); '
              'return [r["prefill_grid"], r["decode_grid"]]'),
}


def fresh(call: str, threads: int) -> dict:
    """The call timed twice in a fresh interpreter: {"times": [[wall, cpu] cold, [wall, cpu] warm], "m": ...}."""
    code = _PREDICT.format(threads=threads, call=call)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def generate_ttft(threads: int, max_tokens: int = 8) -> dict:
    """``waferllm generate`` as a user runs it: seconds from the process start to the first
    generated text on stdout, to the end, and the host breakdown from its --json twin."""
    cmd = [sys.executable, "-m", "waferllm", "generate", "--max-tokens", str(max_tokens), "--prompt", PROMPT,
           "--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = proc.stdout.read()
    proc.wait()
    t_end = time.perf_counter() - t0
    return {"first_s": t_first, "end_s": t_end, "text": (first + rest).decode(errors="replace").strip()[:80]}


# The breakdown of the same command's steps, timed in one process.
_STEPS = """
import json, time
t = time.perf_counter()
from waferllm.engine.threads import set_threads
set_threads({threads})
from waferllm import LLM, SamplingParams
from waferllm.engine import llm as L
from waferllm.models.loader import load_model
imported = time.perf_counter() - t
t = time.perf_counter(); model = load_model(); load = time.perf_counter() - t
ids = model.tokenizer.encode({prompt!r}, add_special_tokens=True)
tune = []
orig = L.LLM._tune
def timed(self, *a):
    t = time.perf_counter(); out = orig(self, *a); tune.append(time.perf_counter() - t); return out
L.LLM._tune = timed
t = time.perf_counter(); llm = LLM(model, max_model_len=len(ids) + {max_tokens}); init = time.perf_counter() - t
o = llm.generate_ids(ids, SamplingParams(temperature=0, max_tokens={max_tokens}, ignore_eos=True))
h = o.metrics["host"]
print(json.dumps({{"import": imported, "load": load, "init": init, "tune": sum(tune), "placement": h["placement_wall_s"],
                   "prefill": h["prefill_time_s"], "grids": [llm.run.prefill_grid, llm.run.decode_grid],
                   "prompt": len(ids)}}))
"""


def generate_steps(threads: int, max_tokens: int = 8) -> dict:
    code = _STEPS.format(threads=threads, prompt=PROMPT, max_tokens=max_tokens)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


WARMUP_PROMPTS = ("A short prompt about memory.", "Another prompt, of another length, about meshes and cores.")


def numeric_vs_reference(model, grids: list[tuple[int, int]], max_tokens: int, out: Out) -> None:
    """Host seconds per prompt token and per generated token, wafer (numeric, both numerics
    paths) vs the dense reference."""
    import numpy as np

    from waferllm import LLM, SamplingParams
    from waferllm.models.reference import ReferenceModel

    ids = model.tokenizer.encode(LONG_PROMPT, add_special_tokens=True)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    rm = ReferenceModel(model.weights)
    # best of 3, wall and CPU apart (this process's CPU seconds: steadier on a shared host)
    ref_prefill, ref_step, ref_tokens = [float("inf")] * 2, [float("inf")] * 2, None
    steps = max(1, max_tokens - 1)
    for _ in range(3):
        rm.reset()
        t, c = time.perf_counter(), time.process_time()
        logits = rm.prefill(ids)
        ref_prefill = [min(ref_prefill[0], time.perf_counter() - t), min(ref_prefill[1], time.process_time() - c)]
        toks = [int(np.argmax(logits[-1]))]
        t, c = time.perf_counter(), time.process_time()
        for _ in range(max_tokens - 1):
            toks.append(int(np.argmax(rm.decode(toks[-1]))))
        ref_step = [min(ref_step[0], (time.perf_counter() - t) / steps), min(ref_step[1], (time.process_time() - c) / steps)]
        ref_tokens = toks
    rows = []
    for pg, dg in grids:
        for numerics in ("fused", "mesh"):
            kw = {} if pg is None else {"prefill_grid": pg, "decode_grid": dg}
            llm = LLM(model, wafer="wse2", dtype="fp16", max_model_len=len(ids) + max_tokens, numerics=numerics, **kw)
            # earlier requests of other lengths pay the one-time host work (conversions, caches);
            # the measured one meets programs of a new length, as a served request would
            for other in WARMUP_PROMPTS:
                llm.generate_ids(model.tokenizer.encode(other, add_special_tokens=True), params)
            o = llm.generate_ids(ids, params)
            h = o.metrics["host"]
            gen = max(1, h["generated_tokens"] - 1)
            per_tok = [h["decode_time_s"] / gen, h["decode_cpu_s"] / gen]
            per_prompt = [h["prefill_time_s"] / len(ids), h["prefill_cpu_s"] / len(ids)]
            match = sum(a == b for a, b in zip(o.token_ids, ref_tokens))
            ratio = [per_prompt[i] / (ref_prefill[i] / len(ids)) for i in (0, 1)]
            step = [per_tok[i] / ref_step[i] for i in (0, 1)]
            rows.append([f"{llm.run.prefill_grid}/{llm.run.decode_grid}" + (" (tuned)" if pg is None else ""), numerics,
                         f"{per_prompt[0] * 1e3:.1f} ({per_prompt[1] * 1e3:.1f})", f"{ratio[0]:.2f}x ({ratio[1]:.2f}x)",
                         f"{per_tok[0] * 1e3:.1f} ({per_tok[1] * 1e3:.1f})", f"{step[0]:.2f}x ({step[1]:.2f}x)",
                         f"{match}/{len(ref_tokens)}"])
    out(f"Dense reference (numpy fp32, best of 3), wall (CPU): prefill {ref_prefill[0] * 1e3:.1f} "
        f"({ref_prefill[1] * 1e3:.1f}) ms for {len(ids)} tokens ({ref_prefill[0] / len(ids) * 1e3:.2f} "
        f"({ref_prefill[1] / len(ids) * 1e3:.2f}) ms per prompt token), decode {ref_step[0] * 1e3:.2f} "
        f"({ref_step[1] * 1e3:.2f}) ms per generated token.")
    out()
    out.table(["grids pre/dec", "numerics", "wafer ms / prompt token, wall (CPU)", "vs reference, wall (CPU)",
               "wafer ms / generated token, wall (CPU)", "vs reference, wall (CPU)", "greedy tokens = reference"], rows)
    out()
    out("numerics fused: a layer (or LM head) whose program has run replays its cost and SRAM high-water marks and "
        "computes its values as dense products (waferllm.engine.fused); the first layer of every new program still runs "
        "on the mesh (a prompt of a new tile count: shape-only; a new cache occupancy: primitive by primitive). mesh: "
        "every layer primitive by "
        "primitive. The predicted figures of both are the same (tests/test_fused_numerics.py).")
    out()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads and simulator workers (stated in every figure)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens generated in section 4")
    ap.add_argument("--grids", default="32/24,32/48", help="section 4's fixed grids beside the tuned ones (pre/dec,...)")
    ap.add_argument("--markdown", default=None, help="also write the output to this file")
    args = ap.parse_args()
    from waferllm.engine.threads import set_threads

    set_threads(args.threads)
    import numpy as np

    from waferllm.models.loader import load_model

    out = Out()
    t_all = time.perf_counter()
    th = f"threads={args.threads}"
    out("# Simulation speed")
    out()
    out("Command: `.venv/bin/python benchmarks/simulation_speed.py " + " ".join(sys.argv[1:]) + "`")
    out()
    out(f"Host: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}; "
        f"every figure at {th} (BLAS threads and simulator workers); load average at start "
        f"{os.getloadavg()[0]:.2f} (other work shares this host, so wall times are upper bounds; CPU time "
        f"beside them). Code: {code_version()}.")
    out()

    # ------------------------------------------------------------------ 1, 2: dry runs
    rows = []
    for key, label in (("llama3-8b", "llama3-8b, 1 wafer, 600/360, 2048/128, band"),
                       ("llama3-70b", "llama3-70b, 10 wafers, 600/360, 2048/128, band"),
                       ("qwen2-72b", "qwen2-72b, --wafers auto, 600/360, 2048/128, band"),
                       ("tuner", "tune_grids: llama3-8b, 2048/128, both grids auto")):
        r = fresh(CALLS[key], args.threads)
        (cw, cc), (ww, wc) = r["times"]
        rows.append([label, f"{cw:.2f} ({cc:.2f})", f"{ww:.2f} ({wc:.2f})", json.dumps(r["m"])])
    out(f"## 1. Dry-run predict and the grid tuner ({th})")
    out()
    out.table(["call", "cold s, wall (CPU)", "warm s, wall (CPU)", "result (TTFT s, or wafers/options, or grids)"], rows)

    # ------------------------------------------------------------------ 3: generate's first token
    g = generate_ttft(args.threads)
    s = generate_steps(args.threads)
    out(f"## 2. Time to first token of `waferllm generate` ({th})")
    out()
    out(f"`waferllm generate --max-tokens 8 --prompt \"{PROMPT}\" --threads {args.threads}`: first generated text on "
        f"stdout {g['first_s']:.1f} s after the process started, last {g['end_s']:.1f} s (greedy: \"{g['text']}\").")
    out()
    out.table(["step (same command, one process)", "s"],
              [["import waferllm", f"{s['import']:.2f}"], ["load SmolLM2 (GGUF)", f"{s['load']:.2f}"],
               ["LLM(): tune grids (dry runs)", f"{s['tune']:.2f}"],
               ["LLM(): place on the wafer (numeric)", f"{s['placement']:.2f}"],
               ["LLM() other (fit checks, planning)", f"{s['init'] - s['tune'] - s['placement']:.2f}"],
               [f"prefill of {s['prompt']} tokens on grid {s['grids'][0]}, first token", f"{s['prefill']:.2f}"]])

    # ------------------------------------------------------------------ 4: numeric vs reference
    model = load_model()
    grids = [(None, None)] + [tuple(int(x) for x in p.split("/")) for p in args.grids.split(",") if p]
    n_prompt = len(model.tokenizer.encode(LONG_PROMPT, add_special_tokens=True))
    out(f"## 3. Numeric simulation vs the dense reference ({th}; SmolLM2, fp16 on the wafer; a {n_prompt}-token "
        f"prompt after two requests of other lengths, {args.max_tokens} greedy tokens)")
    out()
    numeric_vs_reference(model, grids, args.max_tokens, out)
    out(f"Load average at end: {os.getloadavg()[0]:.2f}. Total benchmark wall time: {time.perf_counter() - t_all:.0f} s.")
    out.save(args.markdown)


if __name__ == "__main__":
    main()
