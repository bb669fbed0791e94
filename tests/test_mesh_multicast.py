"""multicast: the root's tile reaches exactly the span, and the cost follows the farther end."""

import numpy as np
import pytest

from waferllm.errors import MeshError
from waferllm.hardware import get_wafer
from waferllm.mesh import DistTensor, Mesh, comm
from waferllm.mesh.cost import message_cycles


@pytest.mark.parametrize("axis", ["x", "y"])
def test_multicast_numerics_and_cost(axis):
    w = get_wafer("wse2")
    m = Mesh.square(w, 7)
    rng = np.random.default_rng(0)
    tiles = rng.standard_normal((7, 7, 3)).astype(np.float32)
    t = DistTensor(m, (3,), (None,), "fp32", tiles, name="t")
    before = m.ledger.cycles
    out = comm.multicast(t, axis, root=2, lo=1, hi=6)
    ax = 0 if axis == "y" else 1
    expect = tiles.copy()
    if ax == 1:
        expect[:, 1:6] = tiles[:, 2:3]
    else:
        expect[1:6] = tiles[2:3]
    assert np.array_equal(out.tiles, expect)
    # a multicast is a collective: its messages, its fixed cost and a task switch
    assert m.ledger.cycles - before == pytest.approx(message_cycles(w, 12, 3) + w.collective_overhead_cycles
                                                     + w.task_switch_cycles)


def test_multicast_rejects_bad_span_and_split_tensor():
    m = Mesh.square(get_wafer("wse2"), 4)
    t = m.place(np.ones(8, np.float32), ("x",))
    with pytest.raises(MeshError, match="split along x"):
        comm.multicast(t, "x", 0, 0, 4)
    r = m.place(np.ones(3, np.float32), (None,))
    with pytest.raises(MeshError, match=r"root 5 and span \[0, 4\) must lie in a line of 4"):
        comm.multicast(r, "x", 5, 0, 4)
