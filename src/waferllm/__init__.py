"""waferllm: LLM inference on a simulated wafer-scale accelerator.

Layers, each a subpackage, with dependencies pointing one way only::

    hardware -> mesh -> kernels -> models -> engine -> interfaces

The user-facing API mirrors vLLM: ``LLM(model=..., wafer="wse2")`` and
``SamplingParams(...)``. They are imported lazily so that ``import waferllm``
stays cheap.
"""

from waferllm.errors import WaferLLMError

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "WaferLLMError", "__version__"]


def __getattr__(name):
    if name == "LLM":
        from waferllm.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from waferllm.engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
