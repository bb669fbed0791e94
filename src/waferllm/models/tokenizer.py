"""Tokenizers: HF ``tokenizers`` built from ``tokenizer.json`` or from a GGUF's vocabulary.

GGUF vocabularies are rebuilt exactly as ``transformers`` does for
``AutoTokenizer.from_pretrained(dir, gguf_file=...)``:

* ``gpt2`` (byte-level BPE): GPT-2 byte-level pre-tokenizer, or the split regex named by
  ``tokenizer.ggml.pre`` (llama3, qwen2, ...); byte-level decoder.
* ``llama`` (SentencePiece BPE): ``Metaspace`` (prepend on the first piece), byte fallback,
  merges from the file or derived from the scores.

Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain
added tokens, so ``<|im_start|>`` stays one id.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from typing import Any, Sequence

from waferllm.errors import ModelError, RequestError, WaferLLMError
from waferllm.models.chat import render_chat

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
}


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def _byte_level_word():
    """A regex whose ``fullmatch`` tells a string made only of byte-level characters (the
    values of :func:`_bytes_to_unicode`): ``set(t) <= alphabet`` for one token, in C."""
    chars = sorted(set(_bytes_to_unicode().values()))
    return re.compile("[" + "".join(re.escape(c) for c in chars) + "]*")


def _derive_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary, best score first (as transformers)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for tok, score in zip(tokens, scores):
        local = []
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            if a in vocab and b in vocab:
                local.append((a, b, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _guard(name: str, what: str, fn):
    """Run a call into the ``tokenizers`` library; its failures (a Rust panic is a
    BaseException) become a ModelError naming the tokenizer."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError, WaferLLMError):
        raise
    except BaseException as exc:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        raise ModelError(f"{name}: the tokenizer failed to {what} ({type(exc).__name__}: {exc})") from None


class Tokenizer:
    """Text <-> token ids, special tokens and the model's chat template."""

    def __init__(self, backend, bos_token_id: int | None = None, eos_token_ids: Sequence[int] = (),
                 chat_template: str | None = None, add_bos_token: bool = False, name: str = "tokenizer"):
        from tokenizers import processors

        self._tok = backend
        self.name = name
        self.bos_token_id = bos_token_id
        self.eos_token_ids = [int(x) for x in eos_token_ids]
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        if add_bos_token and bos_token_id is not None:
            bos = self.id_to_token(bos_token_id)
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_token_id)])

    # ---------------------------------------------------------------- basics
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self):
        return self._tok

    @property
    def bos_token(self) -> str:
        return "" if self.bos_token_id is None else (self.id_to_token(self.bos_token_id) or "")

    @property
    def eos_token(self) -> str:
        return "" if not self.eos_token_ids else (self.id_to_token(self.eos_token_ids[0]) or "")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise RequestError(f"text to tokenize must be a string, got {type(text).__name__}")
        return _guard(self.name, "encode", lambda: list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return _guard(self.name, "decode", lambda: self._tok.decode([int(i) for i in ids],
                                                                    skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render a conversation (a list of ``{"role", "content"}`` or one user string) to a prompt."""
        template = self.chat_template
        if template is None:
            from waferllm.models.chat import CHATML_TEMPLATE, PLAIN_TEMPLATE

            template = CHATML_TEMPLATE if self.token_to_id("<|im_start|>") is not None else PLAIN_TEMPLATE
        return render_chat(template, messages, add_generation_prompt, bos_token=self.bos_token,
                           eos_token=self.eos_token, **extra)

    # ---------------------------------------------------------- constructors
    @classmethod
    def from_hf_dir(cls, directory: str, eos_token_ids: Sequence[int] = (), bos_token_id: int | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTok

        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise ModelError(f"{directory}: no tokenizer.json")
        backend = _guard(path, "load", lambda: HFTok.from_file(path))
        cfg: dict = {}
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    cfg = json.load(f)
            except (ValueError, RecursionError, OSError) as exc:
                raise ModelError(f"{cfg_path}: corrupt JSON ({type(exc).__name__}: {exc})") from None
            if not isinstance(cfg, dict):
                raise ModelError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = [t for t in template if isinstance(t, dict) and isinstance(t.get("template"), str)]
            template = next((t["template"] for t in named if t.get("name") == "default"),
                            named[0]["template"] if named else None)
        if template is not None and not isinstance(template, str):
            raise ModelError(f"{cfg_path}: chat_template must be a string or a list of named templates")
        tpl_file = os.path.join(directory, "chat_template.jinja")
        if template is None and os.path.isfile(tpl_file):
            try:
                with open(tpl_file, encoding="utf-8") as f:
                    template = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelError(f"{tpl_file}: cannot read the chat template ({exc})") from None

        def tok_id(v) -> int | None:
            if isinstance(v, dict):
                v = v.get("content")
            return backend.token_to_id(v) if isinstance(v, str) else None

        bos = bos_token_id if bos_token_id is not None else tok_id(cfg.get("bos_token"))
        eos = list(eos_token_ids) or [t for t in [tok_id(cfg.get("eos_token"))] if t is not None]
        return _guard(path, "load", lambda: cls(backend, bos_token_id=bos, eos_token_ids=eos, chat_template=template,
                                                add_bos_token=False, name=os.path.basename(os.path.normpath(directory))))

    @classmethod
    def from_gguf_metadata(cls, meta: dict, name: str = "gguf", eos_token_ids: Sequence[int] | None = None) -> "Tokenizer":
        """The tokenizer a GGUF's metadata describes; any inconsistency is a ModelError naming the file."""
        try:
            return _guard(name, "build from the GGUF vocabulary",
                          lambda: cls._from_gguf_metadata(meta, name, eos_token_ids))
        except ModelError as exc:
            msg = str(exc)
            raise ModelError(msg if msg.startswith(str(name)) else f"{name}: {msg}") from None

    @classmethod
    def _from_gguf_metadata(cls, meta: dict, name: str, eos_token_ids: Sequence[int] | None) -> "Tokenizer":
        from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
        from tokenizers import Tokenizer as HFTok
        from tokenizers.models import BPE

        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelError(f"{name}: GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        types = meta.get("tokenizer.ggml.token_type") or []
        merges_raw = meta.get("tokenizer.ggml.merges")
        try:
            if kind == "gpt2":
                spelling = _bytes_to_unicode()
                byte_level = _byte_level_word().fullmatch
                vocab = {}
                for i, t in enumerate(tokens):
                    key = t if byte_level(t) else "".join(spelling[b] for b in t.encode("utf-8"))
                    vocab.setdefault(key, i)
                merges = [tuple(m.split(" ", 1)) for m in (merges_raw or [])]
                backend = HFTok(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                    end_of_word_suffix="", fuse_unk=False))
                split = _SPLITS.get(meta.get("tokenizer.ggml.pre"))
                if split is not None:
                    backend.pre_tokenizer = pre_tokenizers.Sequence([
                        pre_tokenizers.Split(Regex(split), behavior="isolated"),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
                else:
                    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
                backend.decoder = decoders.ByteLevel()
                control_ok = lambda t: byte_level(t) is not None  # noqa: E731
            elif kind == "llama":
                vocab = {}
                for i, t in enumerate(tokens):
                    vocab.setdefault(t, i)
                if merges_raw is not None:
                    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
                else:
                    scores = meta.get("tokenizer.ggml.scores")
                    if scores is None:
                        raise ModelError(f"{name}: SentencePiece vocabulary without scores or merges")
                    merges = _derive_merges(tokens, scores)
                unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
                backend = HFTok(BPE(vocab=vocab, merges=merges, unk_token=tokens[int(unk)], fuse_unk=True,
                                    byte_fallback=True, dropout=None))
                backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
                backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                     decoders.Fuse(), decoders.Strip(content=" ", left=1)])
                control_ok = lambda t: True  # noqa: E731
            else:
                raise ModelError(f"{name}: unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{name}: cannot build the tokenizer from GGUF metadata ({type(exc).__name__}: {exc})") from None

        control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3 and control_ok(t)]
        if control:
            backend.add_special_tokens(control)
        user = [t for t, ty in zip(tokens, types) if ty == 4]
        if user:  # (reading the whole vocabulary back costs ~0.1 s: only when there are user tokens)
            vocab_now = backend.get_vocab()
            user = [AddedToken(t, normalized=False, special=False) for t in user if t in vocab_now]
        if user:
            backend.add_tokens(user)

        bos = meta.get("tokenizer.ggml.bos_token_id")
        if eos_token_ids is None:
            eos = meta.get("tokenizer.ggml.eos_token_id")
            eos_token_ids = [] if eos is None else [int(eos)]
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = kind == "llama"
        return cls(backend, bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_token_ids,
                   chat_template=meta.get("tokenizer.chat_template"), add_bos_token=bool(add_bos), name=name)
