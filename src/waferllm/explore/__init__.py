"""Design-space exploration: sweeps of predictions over wafer constants, models and run settings
(:mod:`.spec`, :mod:`.sweep`, on Ray or in this process) and pictures of predictions and sweeps
(:mod:`.plots`).

    from waferllm.explore import run_sweep, plot_sweep
    res = run_sweep("docs/sweeps/sram.toml", "sram.csv")          # local Ray with every core
    plot_sweep(res.rows, "plots/", swept=["sram_bytes_per_pe"])
"""

from waferllm.explore.spec import SweepError, SweepSpec, load_spec, spec_from_mapping
from waferllm.explore.sweep import SweepResult, evaluate_point, read_results, run_sweep


def plot_sweep(*args, **kwargs):
    """See :func:`waferllm.explore.plots.plot_sweep` (matplotlib is imported on first use)."""
    from waferllm.explore.plots import plot_sweep as _plot

    return _plot(*args, **kwargs)


def plot_prediction(*args, **kwargs):
    """See :func:`waferllm.explore.plots.plot_prediction`."""
    from waferllm.explore.plots import plot_prediction as _plot

    return _plot(*args, **kwargs)


__all__ = ["SweepError", "SweepSpec", "SweepResult", "load_spec", "spec_from_mapping", "run_sweep", "read_results",
           "evaluate_point", "plot_sweep", "plot_prediction"]
