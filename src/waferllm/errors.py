"""One exception hierarchy for everything a user can get wrong.

Every error raised for bad input (a hardware file, a model file, a placement that
does not fit, a bad request) derives from :class:`WaferLLMError`, so callers can
catch one type and the CLI can print a clean message instead of a traceback.

A message says what is wrong and, where something would work, what (checked before it
is offered). Structured details travel in ``error.context`` (e.g. ``file``, ``tensor``,
``phase``, ``grid``, ``fit_grid``), so a caller can rephrase the advice for its own
options (the CLI names its flags, the Python API its keywords) without parsing text.
"""

from __future__ import annotations


class WaferLLMError(Exception):
    """Base class of every error the project raises on purpose.

    ``WaferLLMError(message, **context)``: ``context`` holds structured details of what
    went wrong (which file, tensor, region, phase, grid...)."""

    def __init__(self, *args, **context):
        super().__init__(*args)
        self.context: dict = dict(context)

    def __reduce__(self):  # keeps the context through pickling (multiprocessing)
        return (_rebuild, (type(self), self.args, self.context))


def _rebuild(cls, args, context):
    exc = cls(*args)
    exc.context = dict(context)
    return exc


class HardwareError(WaferLLMError):
    """An invalid wafer/GPU description, an unknown key, or an impossible value."""


class MeshError(WaferLLMError):
    """A region outside the wafer, a layout that does not match a tensor, a bad primitive call."""


class SRAMOverflowError(MeshError):
    """An allocation that does not fit in a PE's local SRAM."""


class RouteOverflowError(MeshError):
    """A primitive needs more static routes through a PE than the router can hold."""


class ModelError(WaferLLMError):
    """A missing, truncated or corrupt model file, an unsupported architecture, a bad config."""


class PlacementError(WaferLLMError):
    """A model that cannot be placed on the wafer with the requested grids."""


class RequestError(WaferLLMError):
    """A bad generation request (sampling parameters, prompt, lengths)."""


def with_context(exc: WaferLLMError, prefix: str) -> WaferLLMError:
    """The same kind of error with ``prefix`` (e.g. ``"placing SmolLM2 on wse2"``) in front of
    its message and the same structured context: for wrapping a deep error on its way up."""
    try:
        new = type(exc)(f"{prefix}: {exc}")
    except Exception:  # a subclass with another signature
        new = WaferLLMError(f"{prefix}: {exc}")
    new.context = {**getattr(exc, "context", {})}
    return new
