"""Serving under load: `waferllm serve` with the embedded SmolLM2, loaded by `waferllm bench serve`.

    .venv/bin/python benchmarks/serve_load.py [--markdown benchmarks/RESULTS-serve.md]
        [--concurrencies 1,4,8] [--prompts-per-level 2] [--max-tokens 16] [--max-num-seqs 8] [--seed 0]

The server runs in its own process on a free port of 127.0.0.1 (prefill and decode grids
20, max_model_len 128, wse2), so the client's timing does not share its interpreter.
Each concurrency C sends ``C x --prompts-per-level`` greedy completions of ``--max-tokens``
tokens (EOS ignored), all at once, at most C in flight. Host figures are what this machine
takes to simulate the wafer; wafer figures are what the engine predicts the wafer would
take for the same requests, batched as they were (throughput over the wafer's busy time).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from waferllm.interfaces.loadgen import run_load

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Out  # noqa: E402

SERVER_ARGS = ["--prefill-grid", "20", "--decode-grid", "20", "--max-model-len", "128", "--served-model-name", "smol",
               "--log-level", "warning"]


def start_server(max_num_seqs: int, timeout_s: float = 300.0) -> tuple[subprocess.Popen, str]:
    """`waferllm serve --port 0` in a child process; its URL read from the banner it prints."""
    cmd = [sys.executable, "-m", "waferllm", "serve", "--port", "0", "--max-num-seqs", str(max_num_seqs),
           "--max-waiting", "256", *SERVER_ARGS]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout_s
    url, said = None, []
    while url is None:
        line = proc.stderr.readline()
        said.append(line)
        if not line and proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}) before serving: {''.join(said).strip()}")
        m = re.search(r"on (http://[\d.:]+)/v1", line)
        url = m.group(1) if m else None
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start in time")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not answer /health in time")
        time.sleep(0.1)


def _p(s: dict | None, key: str) -> str:
    """Three significant digits, thousands separated ("-" when missing)."""
    v = None if not s else s.get(key)
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--concurrencies", default="1,4,8")
    ap.add_argument("--prompts-per-level", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrencies.split(",")]
    out = Out()
    t0 = time.perf_counter()
    out.header("Serving under load", "serve_load.py")
    out(f"Server: `waferllm serve --max-num-seqs {args.max_num_seqs} {' '.join(SERVER_ARGS[:-2])}` (embedded "
        f"SmolLM2-135M-Instruct, wse2). Load: `waferllm bench serve` with C x {args.prompts_per_level} greedy "
        f"completions of {args.max_tokens} tokens (EOS ignored), all sent at once, at most C in flight. Host: "
        "measured on this machine (the simulation); wafer: predicted for the same requests, batched as they ran. "
        "Times in ms (p50 / p99), throughputs per second.")
    out()
    proc, url = start_server(args.max_num_seqs)
    rows = []
    try:
        for c in levels:
            s = run_load(url + "/v1", "smol", num_prompts=c * args.prompts_per_level, concurrency=c,
                         max_tokens=args.max_tokens, seed=args.seed)
            h, w = s["host"], s["wafer"]
            rows.append([c, f"{s['completed']}/{s['completed'] + s['failed']}",
                         f"{_p(h['ttft_ms'], 'p50')} / {_p(h['ttft_ms'], 'p99')}", _p(h["tpot_ms"], "p50"),
                         _p(h["e2el_ms"], "p50"), _p(h, "request_throughput"), _p(h, "output_throughput"),
                         f"{_p(w['ttft_ms'], 'p50')} / {_p(w['ttft_ms'], 'p99')}", _p(w["tpot_ms"], "p50"),
                         _p(w["e2el_ms"], "p50"), _p(w, "request_throughput"),
                         _p(w, "output_throughput")])
            print(f"  concurrency {c}: {s['completed']} completed, host {h['output_throughput']:.2f} tok/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    out.table(["C", "done", "host TTFT", "host TPOT", "host E2EL", "host req/s", "host tok/s", "wafer TTFT",
               "wafer TPOT", "wafer E2EL", "wafer req/s", "wafer tok/s"], rows)
    out(f"Total benchmark wall time: {time.perf_counter() - t0:.0f} s.")
    out.save(args.markdown)


if __name__ == "__main__":
    main()
