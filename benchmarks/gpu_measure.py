"""Measure batch-1 serving performance of the model presets on this machine's GPU with vLLM.

For each model preset (waferllm.models.presets) that fits the GPUs, it builds a Hugging
Face config directory of the right shape (no weights: vLLM's ``load_format="dummy"``
fills them with random values, which is all timing needs), starts vLLM on it in a
subprocess of its own, and measures, at several prompt lengths, batch 1, fp16:

* prefill tokens/s = input_len / (time of a request with 1 output token), the median of
  ``--repeats`` runs (every prompt is fresh random tokens; prefix caching is off);
* decode tokens/s per request = output_len / (time with 1 + output_len output tokens -
  time with 1), medians likewise.

It writes both as measurements in the format of ``waferllm/hardware/measurements.toml``
(system "gpu", args: model, gpus, gpu, input_len, output_len), from which the calibrated
GPU model is refitted. On a GPU machine (NVIDIA GPU with CUDA, ``pip install vllm``):

    python benchmarks/gpu_measure.py --output gpu_measured.toml
    python benchmarks/gpu_measure.py --tp 8 --models llama3-8b,llama2-13b,codellama-34b,qwen2-72b \\
        --output gpu_measured_tp8.toml
    python benchmarks/gpu_calibrate.py --gpu h100 --measurements gpu_measured.toml          # the fit's table
    python benchmarks/gpu_calibrate.py --gpu h100 --measurements gpu_measured.toml --write  # store it

The GPU preset is recognised from the device name (A100 80GB, H100 SXM, H200, B200) or
given with ``--gpu``. One node only (``--tp`` up to the GPUs visible). Without a CUDA GPU
or without vLLM it measures nothing: it says what is missing and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFUSED = 2
DEFAULT_LENGTHS = (512, 2048, 4096)


# ------------------------------------------------------------------------------ environment
def missing_requirements(tp: int = 1) -> list[str]:
    """What this machine lacks to run the measurement (empty: it can run)."""
    problems = []
    if importlib.util.find_spec("vllm") is None:
        problems.append("vLLM is not installed (pip install vllm)")
    if importlib.util.find_spec("torch") is None:
        problems.append("PyTorch is not installed, so no CUDA GPU can be used")
    else:
        import torch

        if not torch.cuda.is_available():
            problems.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
        elif torch.cuda.device_count() < tp:
            problems.append(f"--tp {tp} needs {tp} GPUs but {torch.cuda.device_count()} are visible")
    return problems


def preset_for_device(name: str, memory_bytes: float) -> str | None:
    """The GPU preset a CUDA device name stands for, or None if it is not one of ours."""
    n = name.upper()
    if "PCIE" in n or " NVL" in n:  # different bandwidths and power from the SXM parts
        return None
    if "A100" in n and memory_bytes > 60e9:
        return "a100"
    for key in ("H100", "H200", "B200"):
        if key in n:
            return key.lower()
    return None


# ------------------------------------------------------------------------------ one model (worker)
def _hf_dir(model: str, max_len: int, where: str) -> str:
    from waferllm.models.presets import get_model_preset
    from waferllm.models.testing import hf_config_dict

    cfg = hf_config_dict(get_model_preset(model))
    cfg["torch_dtype"] = "float16"
    # random weights: a longer position range than the release only lets vLLM accept the lengths asked for
    cfg["max_position_embeddings"] = max(int(cfg["max_position_embeddings"]), max_len)
    path = Path(where) / model
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(path)


def worker(spec: dict) -> dict:
    """Run vLLM on one model preset and time it (runs in a subprocess of its own)."""
    import vllm
    from vllm import LLM, SamplingParams

    from waferllm.models.presets import get_model_preset

    lengths, out_len, repeats = spec["lengths"], spec["output_len"], spec["repeats"]
    vocab = get_model_preset(spec["model"]).vocab_size
    max_len = max(lengths) + out_len + 8
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(model=_hf_dir(spec["model"], max_len, tmp), load_format="dummy", dtype="float16",
                  tensor_parallel_size=spec["tp"], max_model_len=max_len, skip_tokenizer_init=True,
                  enable_prefix_caching=False, gpu_memory_utilization=spec["gpu_memory_utilization"], seed=0)
        rng = random.Random(0)

        def timed(n_in: int, n_out: int) -> float:
            ids = [rng.randrange(10, vocab - 10) for _ in range(n_in)]  # fresh tokens: nothing cached
            params = SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True, detokenize=False)
            t0 = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)  # returns when all tokens exist
            dt = time.perf_counter() - t0
            got = len(out[0].outputs[0].token_ids)
            if got != n_out:
                raise RuntimeError(f"asked for {n_out} output tokens, vLLM produced {got}")
            return dt

        timed(64, 8)  # warm-up: CUDA graphs, allocator, kernels' autotuning
        rows = []
        for n_in in lengths:
            timed(n_in, 1)
            first = statistics.median(timed(n_in, 1) for _ in range(repeats))
            whole = statistics.median(timed(n_in, 1 + out_len) for _ in range(repeats))
            rows.append({"input_len": n_in, "output_len": out_len, "ttft_s": first, "decode_s": whole - first,
                         "prefill_tokens_per_s": n_in / first, "decode_tokens_per_s": out_len / (whole - first)})
    return {"model": spec["model"], "vllm": getattr(vllm, "__version__", "?"), "device": spec["device"], "rows": rows}


# ------------------------------------------------------------------------------ the run
def _fits(model: str, gpu: str, tp: int, max_len: int, utilisation: float) -> tuple[bool, str]:
    from waferllm.hardware.gpu_roofline import gpu_inference_roofline
    from waferllm.models.presets import get_model_preset

    r = gpu_inference_roofline(get_model_preset(model), gpu, tp, input_len=max_len, output_len=1)
    need, have = r["memory_bytes"], utilisation * r["memory_capacity_bytes"]
    return need <= have, f"needs {need / 1e9:.0f} GB of {have / 1e9:.0f} GB usable on {tp} GPU(s)"


def entries(result: dict, gpu: str, tp: int, repeats: int, stamp: str) -> list[dict]:
    from waferllm.hardware.gpu import get_gpu

    spec = get_gpu(gpu)
    where = f"{tp} x {spec.name}" + (" tensor parallel" if tp > 1 else "")
    source = (f"benchmarks/gpu_measure.py: vLLM {result['vllm']} on {tp} x {result['device']}, "
              f"{result['model']} shape with random weights, fp16, batch 1, median of {repeats}, {stamp}")
    out = []
    for row in result["rows"]:
        args = {"model": result["model"], "gpus": tp, "gpu": spec.key, "input_len": row["input_len"],
                "output_len": row["output_len"]}
        tag = f"{spec.key}.vllm.{result['model']}.{{}}.{tp}.in{row['input_len']}"
        out.append({"id": tag.format("prefill"), "system": "gpu", "kind": "absolute",
                    "quantity": f"{result['model']} prefill tokens/s ({row['input_len']}-token input), {where} (vLLM)",
                    "value": round(row["prefill_tokens_per_s"], 2), "unit": "tokens/s", "tolerance": 0.15,
                    "model": "gpu_prefill_tps", "args": args, "source": source})
        out.append({"id": tag.format("decode"), "system": "gpu", "kind": "absolute",
                    "quantity": f"{result['model']} decode tokens/s per request at {row['input_len']} tokens of "
                                f"context, {row['output_len']} output tokens, {where} (vLLM)",
                    "value": round(row["decode_tokens_per_s"], 3), "unit": "tokens/s", "tolerance": 0.15,
                    "model": "gpu_decode_tpr", "args": args, "source": source})
    return out


def main(argv: list[str] | None = None) -> int:
    from waferllm.models.presets import list_model_presets

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(list_model_presets()), help="comma-separated model presets")
    ap.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="prompt lengths (tokens)")
    ap.add_argument("--output-len", type=int, default=128, help="output tokens timed for decode")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (one node)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu", default="auto", help="GPU preset (a100, h100, h200, b200); auto: from the device name")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds allowed per model")
    ap.add_argument("--output", default="gpu_measured.toml", help="measurement file to write")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        Path(spec["result"]).write_text(json.dumps(worker(spec)))
        return 0

    problems = missing_requirements(args.tp)
    if problems:
        print("gpu_measure: refusing to run, nothing was measured: " + "; ".join(problems) + ".\n"
              "Run it on a machine with an NVIDIA GPU and vLLM, e.g.\n"
              "    pip install vllm && python benchmarks/gpu_measure.py --output gpu_measured.toml\n"
              "then refit with: python benchmarks/gpu_calibrate.py --gpu <preset> --measurements gpu_measured.toml",
              file=sys.stderr)
        return REFUSED
    import torch

    device = torch.cuda.get_device_name(0)
    gpu = preset_for_device(device, torch.cuda.get_device_properties(0).total_memory) if args.gpu == "auto" else args.gpu
    if gpu is None:
        print(f"gpu_measure: {device!r} is not one of the GPU presets (A100 80GB, H100 SXM, H200, B200); "
              f"pass --gpu PRESET if its figures apply", file=sys.stderr)
        return REFUSED
    from waferllm.hardware.gpu import get_gpu

    gpu = get_gpu(gpu).key
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    stamp = time.strftime("%Y-%m-%d")
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            ok, why = _fits(model, gpu, args.tp, max(lengths) + args.output_len, args.gpu_memory_utilization)
            if not ok:
                print(f"{model}: skipped, does not fit ({why})", file=sys.stderr)
                continue
            spec = {"model": model, "lengths": lengths, "output_len": args.output_len, "repeats": args.repeats,
                    "tp": args.tp, "gpu_memory_utilization": args.gpu_memory_utilization, "device": device,
                    "result": os.path.join(tmp, f"{model}.json")}
            print(f"{model}: measuring on {args.tp} x {device} ...", file=sys.stderr)
            try:
                proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{model}: gave up after {args.timeout} s", file=sys.stderr)
                continue
            if proc.returncode != 0 or not os.path.exists(spec["result"]):
                print(f"{model}: vLLM run failed (exit {proc.returncode}); see its output above", file=sys.stderr)
                continue
            result = json.loads(Path(spec["result"]).read_text())
            measured += entries(result, gpu, args.tp, args.repeats, stamp)
            for row in result["rows"]:
                print(f"{model:<14} in {row['input_len']:>6}  prefill {row['prefill_tokens_per_s']:>10,.0f} tokens/s  "
                      f"decode {row['decode_tokens_per_s']:>8,.1f} tokens/s")
    if not measured:
        print("gpu_measure: no model was measured", file=sys.stderr)
        return 1
    from waferllm.baselines.gpu_calibrated import measurements_to_toml

    Path(args.output).write_text(measurements_to_toml(
        measured, header=f"GPU serving measurements written by benchmarks/gpu_measure.py on {stamp}.\n"
                         f"Refit: python benchmarks/gpu_calibrate.py --gpu {gpu} --measurements {args.output}"))
    print(f"wrote {len(measured)} measurements to {args.output}; refit with:\n"
          f"    python benchmarks/gpu_calibrate.py --gpu {gpu} --measurements {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
