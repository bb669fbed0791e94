"""The model, host and wafer options that `generate` and `serve` share (one definition: typer
reuses an Option object as a default). Each takes the help panel, since the two commands
group their options differently; the checks live in ``cmd_generate._check_wafer_options``."""

from __future__ import annotations

import typer


def model(panel: str):
    return typer.Option(None, "--model", "-m", rich_help_panel=panel,
                        help="A .gguf file or HF directory; default: the embedded SmolLM2-135M-Instruct.")


def threads(panel: str):
    return typer.Option(None, "--threads", rich_help_panel=panel,
                        help="Host threads for BLAS and the simulator's tile products (default: the libraries' own; "
                             "1 is steadiest on a shared machine). Only host time changes.")


def wafer(panel: str):
    return typer.Option(None, "--wafer", rich_help_panel=panel,
                        help="Wafer preset name or TOML/JSON file (default: wse2).")


def grid(phase: str, panel: str):
    """--prefill-grid or --decode-grid."""
    return typer.Option(None, f"--{phase}-grid", rich_help_panel=panel,
                        help=f"{phase.capitalize()} regions: P (PxP PEs) or auto, tuned up to 48 (default: auto).")


def dtype(panel: str):
    return typer.Option(None, "--dtype", rich_help_panel=panel, help="fp16 (as the paper) or fp32 (default: fp16).")


def kv_scheme(panel: str):
    return typer.Option(None, "--kv-scheme", rich_help_panel=panel,
                        help="shift (WaferLLM) or concat (baseline) KV cache (default: shift).")


def weights(panel: str):
    return typer.Option(None, "--weights", rich_help_panel=panel,
                        help="Layer weights on the PEs: fp16 (dense, in --dtype), int8 or int4 (GGUF Q8_0/Q4_0 "
                             "blocks, dequantised by the PEs), or native (a GGUF file's own Q8_0/Q4_0) "
                             "(default: fp16).")


def numerics(panel: str):
    return typer.Option(None, "--numerics", rich_help_panel=panel,
                        help="fused (a layer whose program has run replays its cost and computes its values as "
                             "dense products: the same tokens, several times faster) or mesh (every primitive "
                             "on the mesh, also in a --trace) (default: fused). Predictions are the same.")


def llm_kwargs(given: dict) -> dict:
    """The LLM keywords of the checked options (each default where not given)."""
    return {"dtype": given["dtype"] or "fp16", "kv_scheme": given["kv_scheme"] or "shift",
            "weights": given["weights"] or "fp16", "numerics": given.get("numerics") or "fused"}
