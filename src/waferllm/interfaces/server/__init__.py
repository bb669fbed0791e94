"""``waferllm serve``: an OpenAI-compatible HTTP server over the batching scheduler.

``app`` builds the FastAPI app, ``protocol`` checks requests and shapes responses and
errors, ``metrics`` holds the Prometheus metrics, ``worker`` drives the scheduler from one
thread; ``waferllm.interfaces.loadgen`` is the load client (``waferllm bench serve``).
"""

from waferllm.interfaces.server.app import create_app
from waferllm.interfaces.server.worker import ServingEngine

__all__ = ["create_app", "ServingEngine"]
