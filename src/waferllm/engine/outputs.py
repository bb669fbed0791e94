"""What a generation request returns (shaped like vLLM's ``RequestOutput``, flattened to one completion)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finish_reason: str = "length"  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop string / stop token that ended it (None for EOS or length)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict[str, Any]:
        def lp(d):
            return None if d is None else {str(k): float(v) for k, v in d.items()}

        return {
            "prompt": self.prompt,
            "prompt_token_ids": list(self.prompt_token_ids),
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
            "logprobs": None if self.logprobs is None else [lp(d) for d in self.logprobs],
            "prompt_logprobs": None if self.prompt_logprobs is None else [lp(d) for d in self.prompt_logprobs],
            "metrics": dict(self.metrics),
        }
