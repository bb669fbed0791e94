"""Calibration: the fit of each wafer preset's free constants to its SPEC section 5
measurements (absolute measurements first), and the validation table.

- :mod:`waferllm.hardware.measurements`: the data file and its loader (hardware data);
- :mod:`.targets`: the model's value of each measurement, from the same kernels and
  engine code as every prediction (dry runs);
- :mod:`.fit`: the fit of a preset's free constants and writing them back with provenance;
- :mod:`.validate`: every measurement beside the model's value and the error.

The low/high band of a prediction (from ``calibration_error`` and the assumed ranges) is
:mod:`waferllm.engine.band`.
"""

from waferllm.hardware.measurements import Measurement, load_measurements

__all__ = ["Measurement", "load_measurements"]
