"""The options that choose the paper's algorithms or the ones beyond it, shared by `predict`,
`generate` and `serve` (one definition: typer reuses an Option object as a default)."""

from __future__ import annotations

import typer

from waferllm.engine.run_config import ALGORITHMS

PANEL = "Algorithms (the paper's, or beyond it)"

PREFILL_ATTENTION = typer.Option("paper", "--prefill-attention", rich_help_panel=PANEL,
                                 help="paper, or streaming (flash-style: key blocks in flight, running max and sum; "
                                      "more heads per pass).")
DECODE_COLLECTIVES = typer.Option("paper", "--decode-collectives", rich_help_panel=PANEL,
                                  help="paper, or fused (norm statistics ride the GEMV reduce; one collective for "
                                       "softmax and P V).")
GEMV_KTREE = typer.Option("paper", "--gemv-ktree", rich_help_panel=PANEL,
                          help="paper (K=2), or tuned (K and group per reduction by the cost model).")
GEMV_OVERLAP = typer.Option("paper", "--gemv-overlap", rich_help_panel=PANEL,
                            help="paper, or segmented (each decode GEMV's reduce streamed in segments, the product "
                                 "of the next columns overlapping it; the count per GEMV by the cost model).")
BEYOND_PAPER = typer.Option(False, "--beyond-paper", rich_help_panel=PANEL,
                            help="All four improvements at once (streaming, fused, tuned, segmented).")


def chosen(prefill_attention: str, decode_collectives: str, gemv_ktree: str, beyond_paper: bool,
           gemv_overlap: str = "paper") -> dict:
    """The RunConfig fields the options ask for (--beyond-paper: every improvement)."""
    if beyond_paper:
        return {k: v[1] for k, v in ALGORITHMS.items()}
    return {"prefill_attention": prefill_attention, "decode_collectives": decode_collectives,
            "gemv_ktree": gemv_ktree, "gemv_overlap": gemv_overlap}
