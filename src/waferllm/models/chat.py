"""Chat templates, rendered with jinja2 the way transformers does it.

Same environment as ``transformers`` (sandboxed, ``trim_blocks``, ``lstrip_blocks``,
``raise_exception``, ``strftime_now``, a ``tojson`` filter that keeps non-ASCII), so the
model's own template (GGUF ``tokenizer.chat_template`` or ``tokenizer_config.json``)
renders to the same string. Without a template we fall back to ChatML.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

from waferllm.errors import ModelError, RequestError

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: A plain-text fallback for vocabularies without ChatML tokens.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _raise(message: str) -> None:
    raise RequestError(f"chat template: {message}")


@lru_cache(maxsize=16)
def _compile(template: str):
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        import jinja2
    except ImportError as exc:  # pragma: no cover - jinja2 is a dependency
        raise ModelError(f"jinja2 is needed for chat templates ({exc})") from None

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except (jinja2.TemplateError, RecursionError, ValueError, TypeError) as exc:
        raise ModelError(f"invalid chat template ({type(exc).__name__}: {exc})") from None


def normalise_messages(messages: str | Sequence[dict]) -> list[dict]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)):
        raise RequestError(f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RequestError(f"chat message must be a dict with 'role' and 'content', got {m!r:.80}")
        if not isinstance(m["role"], str) or not isinstance(m["content"], (str, list)):
            raise RequestError(f"chat message role must be a string and content a string, got {m!r:.80}")
        out.append(dict(m))
    if not out:
        raise RequestError("chat needs at least one message")
    return out


def render_chat(template: str | None, messages: str | Sequence[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """Render ``messages`` with ``template`` (ChatML when ``None``)."""
    if template is not None and not isinstance(template, str):
        raise ModelError(f"the chat template must be a string, got {type(template).__name__}")
    tpl = _compile(template or CHATML_TEMPLATE)
    try:
        return tpl.render(messages=normalise_messages(messages), add_generation_prompt=add_generation_prompt,
                          bos_token=bos_token, eos_token=eos_token, **extra)
    except RequestError:
        raise
    except Exception as exc:
        raise RequestError(f"chat template failed to render ({type(exc).__name__}: {exc})") from None
