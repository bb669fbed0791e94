"""Our tokenizer (rebuilt from GGUF metadata) against transformers' GGUF tokenizer."""

import os

import pytest

STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and    runs of     spaces  ",
    "line one\nline two\n\n\nthree newlines\r\nwindows\ttab",
    "Unicode: café, naïve, Straße, Ελληνικά, русский, 日本語のテキスト, 中文",
    "Emoji 🤗🚀👍🏽 and ZWJ 👨‍👩‍👧",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "numbers 1234567890 3.14159 -42 1e-5",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after special",
    "It's, they're, we've, I'm, you'll, he'd",
    "",
    " ",
    "\n",
    "Ünïcödé ß ∑∫√ ≤≥ → ← ©®™",
]


def test_encode_matches_transformers(smollm):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d, f = os.path.split(smollm.path)
    hf = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok = smollm.tokenizer
    for s in STRINGS:
        ours = tok.encode(s)
        theirs = hf.encode(s)
        assert ours == theirs, s
        assert tok.encode(s, add_special_tokens=False) == hf.encode(s, add_special_tokens=False), s
        assert tok.decode(ours) == hf.decode(theirs, skip_special_tokens=True), s
        assert tok.decode(ours, skip_special_tokens=False) == hf.decode(theirs, skip_special_tokens=False), s
    assert tok.vocab_size == len(hf)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_special_tokens_and_roundtrip(smollm):
    tok = smollm.tokenizer
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2]
    assert tok.encode("<|im_start|>") == [1]
    assert tok.decode([1, 2]) == ""
    for s in STRINGS:
        if "<|" not in s:
            assert tok.decode(tok.encode(s)) == s


def test_chat_template_fallback(smollm):
    from waferllm.models.tokenizer import Tokenizer

    t = Tokenizer(smollm.tokenizer.backend, bos_token_id=1, eos_token_ids=[2], chat_template=None)
    out = t.apply_chat_template("hi")
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def _sp_meta():
    """A tiny SentencePiece-style ('llama') GGUF vocabulary with scores and no merges."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "el", "ll", "lo", "▁w", "or", "ld", "hel", "hell",
              "▁hel", "▁hell", "▁hello", "▁wor", "▁world", "ello"]
    tokens += pieces
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}


def test_sentencepiece_gguf_vocab():
    from waferllm.models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(_sp_meta(), name="sp")
    ids = tok.encode("hello world")
    assert ids[0] == 1  # add_bos defaults to True for sentencepiece vocabularies
    assert tok.decode(ids) == "hello world"
    assert tok.id_to_token(ids[1]) == "▁hello"
    # bytes not in the vocabulary fall back to <0x..> tokens
    ids = tok.encode("hé", add_special_tokens=False)
    assert tok.decode(ids) == "hé"


def _hf_tokenizer(tmp_path, name: str, meta: dict, add_rest):
    """transformers' tokenizer of a GGUF file holding ``meta``'s vocabulary (``add_rest(writer)``
    adds the fields that differ by model)."""
    import gguf
    import numpy as np
    import transformers

    w = gguf.GGUFWriter(str(tmp_path / name), "llama")
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    add_rest(w)
    w.add_tensor("dummy", np.zeros(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=name)


def test_sentencepiece_matches_transformers(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")

    from waferllm.models.tokenizer import Tokenizer

    meta = _sp_meta()
    hf = _hf_tokenizer(tmp_path, "sp.gguf", meta, lambda w: (
        w.add_token_scores(meta["tokenizer.ggml.scores"]), w.add_bos_token_id(1), w.add_eos_token_id(2),
        w.add_unk_token_id(0)))
    tok = Tokenizer.from_gguf_metadata(meta, name="sp")
    for s in ["hello world", " hello  world", "hello\nworld", "héllo wörld", "dlrow olleh"]:
        assert tok.encode(s) == hf.encode(s), s
        assert tok.decode(tok.encode(s)) == hf.decode(hf.encode(s), skip_special_tokens=True), s


def test_byte_level_check_is_the_alphabet():
    """``_byte_level_word`` (a regex) accepts exactly the strings whose characters are all
    byte-level ones (the values of ``_bytes_to_unicode``)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from waferllm.models.tokenizer import _byte_level_word, _bytes_to_unicode

    alphabet = set(_bytes_to_unicode().values())
    chars = sorted(alphabet) + [" ", "\n", "\x00", "-", "]", "\\", "^", "é", "中", "🚀", "\u0143", "\u00ad", "\u00a0"]

    @settings(max_examples=300, derandomize=True, database=None, deadline=None)
    @given(st.text(alphabet=st.sampled_from(chars), max_size=10) | st.text(max_size=6))
    def check(t):
        assert (_byte_level_word().fullmatch(t) is not None) == (set(t) <= alphabet), repr(t)

    check()


def _gpt2_meta():
    """A tiny byte-level BPE ('gpt2') vocabulary with merges, a control and two user-defined tokens."""
    from waferllm.models.tokenizer import _bytes_to_unicode

    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)] + ["he", "ll", "hell", "hello", "Ġw", "Ġwo", "<|ctl|>", "<custom>", "my tok"]
    types = [1] * 262 + [3, 4, 4]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 262, "tokenizer.ggml.eos_token_id": 262}


def test_gpt2_user_and_control_tokens_match_transformers(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")

    from waferllm.models.tokenizer import Tokenizer

    meta = _gpt2_meta()
    hf = _hf_tokenizer(tmp_path, "bpe.gguf", meta, lambda w: (
        w.add_token_merges(meta["tokenizer.ggml.merges"]), w.add_bos_token_id(262), w.add_eos_token_id(262)))
    tok = Tokenizer.from_gguf_metadata(meta, name="bpe")
    assert tok.encode("<custom>") == [263] and tok.encode("<|ctl|>") == [262]
    for s in ["hello world", "hello<custom>hello", "a<|ctl|>b", "my tok", "héllo <custom> wo"]:
        assert tok.encode(s) == hf.encode(s), s
        assert tok.decode(tok.encode(s), skip_special_tokens=False) == hf.decode(hf.encode(s), skip_special_tokens=False), s
