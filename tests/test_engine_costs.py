"""What the engine's own data movement costs, against a brute-force count.

The prompt's embedding rows leave the PE that holds each (feature, vocabulary entry) of
the table and land on the PE of the activation layout that needs it; the last token's
row leaves the PE row holding it for row 0 of every region's LM head. Brute force: find
every value on the mesh by searching the tiles, count the elements whose PE changes.
Decode's argmax pair is the slice's numpy argmax.
"""

from __future__ import annotations

import numpy as np
import pytest

from waferllm.engine.run_config import RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.hardware import get_wafer
from waferllm.models.testing import random_weights, tiny_config

WSE2 = get_wafer("wse2")


def where(t) -> dict[float, tuple[int, int]]:
    """Wafer (row, column) of the PE holding each value of a tensor's tiles."""
    out = {}
    r0, c0 = t.mesh.region.row0, t.mesh.region.col0
    for (i, j), tile in np.ndenumerate(np.empty(t.tiles.shape[:2])):
        for v in np.asarray(t.tiles[i, j], np.float32).ravel():
            out.setdefault(float(v), (r0 + i, c0 + j))
    return out


def moved_bytes(wm, name: str) -> float:
    return sum(e.counters.get("bytes_moved", 0.0) for e in wm.ledger.events if e.name == name)


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_rows_come_from_the_table_columns_that_hold_them(tied):
    # 4 fp32 layers on 4x4 regions of the real wse2: two prefill regions, the vocabulary split
    cfg = tiny_config(name="deep", num_layers=4, tie_word_embeddings=tied)
    w = random_weights(cfg, seed=3)
    wm = WaferModel(cfg, w, WSE2, RunConfig(4, 4, max_seq_len=24, dtype="fp32"), mode="numeric")
    assert len(wm.prefill_stages) == 2
    rng = np.random.default_rng(0)
    ids = rng.choice(cfg.vocab_size, 11, replace=False)  # distinct rows: every value is findable
    tables = {}
    for st in wm.prefill_stages:
        tables.update(where(st.embed if st.embed is not None else st.lm))
    h = wm._embed_prompt(ids)
    dest = where(h)
    emb = np.asarray(w.embed, np.float32)
    expect = sum(tables[float(v)] != dest[float(v)] for v in emb[ids].ravel()) * 4
    assert moved_bytes(wm, "embedding.gather") == expect > 0
    np.testing.assert_array_equal(h.to_global(), emb[ids])


def test_last_row_moves_from_its_pe_row_to_every_lm_head():
    cfg = tiny_config(num_layers=1)
    w = random_weights(cfg, seed=5)
    big = WSE2.replace(sram_bytes_per_pe=96 * 1024)
    wm = WaferModel(cfg, w, big, RunConfig(4, 4, max_seq_len=24, dtype="fp32"), mode="numeric")
    st = wm.prefill_stages[0]
    L = 11  # rows of 3 tokens: the last one sits on PE row 3
    h = st.mesh.place(np.random.default_rng(1).standard_normal((L, cfg.hidden_size)).astype(np.float32),
                      ("y", "x"), "fp32")
    row = wm._move_last_row(h, L, st.mesh)
    np.testing.assert_array_equal(row.to_global(), h.to_global()[L - 1:])
    src, dst = where(h), where(row)
    expect = sum(src[float(v)] != dst[float(v)] for v in h.to_global()[L - 1]) * 4
    assert moved_bytes(wm, "lm_head.transfer") == expect == cfg.hidden_size * 4  # row 3 to row 0: all of it


def test_decode_argmax_is_the_slices_numpy_argmax():
    cfg = tiny_config(num_layers=1, vocab_size=263)
    w = random_weights(cfg, seed=2)
    big = WSE2.replace(sram_bytes_per_pe=96 * 1024)
    wm = WaferModel(cfg, w, big, RunConfig(None, 5, max_seq_len=24, dtype="fp32"), mode="numeric")
    st = wm.decode_stages[0]
    x = st.mesh.place(np.random.default_rng(4).standard_normal(cfg.hidden_size).astype(np.float32), ("y",), "fp32")
    logits, best = st.lm_head(x)
    assert np.all(best.tiles[..., 0] == logits.max())
    assert np.all(best.tiles[..., 1] == np.argmax(logits))
