"""Greedy sampling on the wafer: the index of the largest logit.

Each PE finds the (value, index) pair of its own tile, then one MAXLOC allreduce along
the vocabulary's mesh axis combines the pairs (largest value, lowest index on ties), so
every PE of the line ends with the slice's argmax.
"""

from __future__ import annotations

from waferllm.errors import MeshError
from waferllm.mesh import comm, compute
from waferllm.mesh.tensor import DistTensor


def argmax(logits: DistTensor, k: int | str = 2, name: str = "argmax") -> DistTensor:
    """(value, index) of the largest entry of a 1-d tensor [V] split along one mesh axis:
    a (2,) fp32 tensor, the same on every PE of each line of that axis."""
    axis = logits.layout[0]
    if axis is None:
        raise MeshError(f"{name}: {logits.name} is not split over the mesh")
    k, _ = comm.ktree_for(logits.mesh, axis, compute.PAIR_BYTES, k)  # k "tuned": the cost model's K for a pair
    pair = compute.tile_argmax(logits, name=f"{name}.local")
    out = compute.allreduce_maxloc(pair, axis, k=k, name=f"{name}.allreduce")
    logits.mesh.sram.release(pair)
    return out
