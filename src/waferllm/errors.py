"""One exception hierarchy for everything a user can get wrong.

Every error raised for bad input (a hardware file, a model file, a placement that
does not fit, a bad request) derives from :class:`WaferLLMError`, so callers can
catch one type and the CLI can print a clean message instead of a traceback.
"""


class WaferLLMError(Exception):
    """Base class of every error the project raises on purpose."""


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
