"""Calibration: the SPEC section 5 measurements as data, the fit of each wafer's free
constants to them (absolute measurements first), and the validation table.

- :mod:`.measurements`: the data file and its loader;
- :mod:`.targets`: the model's value of each measurement, from the same kernels and
  engine code as every prediction (dry runs);
- :mod:`.fit`: the fit of a preset's free constants and writing them back with provenance;
- :mod:`.validate`: every measurement beside the model's value and the error;
- :mod:`.band`: the low/high band of a prediction from residuals and assumed ranges.
"""

from waferllm.calibration.measurements import Measurement, load_measurements

__all__ = ["Measurement", "load_measurements"]
