"""The simulated fabric: regions, distributed tensors, primitives, and their accounting.

    from waferllm.mesh import Mesh, comm, compute
    mesh = Mesh.square(get_wafer("wse2"), 64)           # numeric; mode="dry" for shapes only
    x = mesh.place(array, ("y", "x"), "fp16")
    x = comm.ring_shift(x, "x", 1)                       # INTERLEAVE ring, 2 hops max
    mesh.ledger.summary()                                # cycles, flops, bytes, energy ...
"""

from waferllm.mesh import comm, compute
from waferllm.mesh.host import keep_freed_memory
from waferllm.mesh.interleave import ring_max_hops, ring_next, ring_order
from waferllm.mesh.ledger import Ledger
from waferllm.mesh.region import Region
from waferllm.mesh.runtime import Mesh
from waferllm.mesh.tensor import DistTensor

keep_freed_memory()  # see mesh.host: a third of a dry run's host time was page faults

__all__ = ["DistTensor", "Ledger", "Mesh", "Region", "comm", "compute", "ring_max_hops", "ring_next", "ring_order"]
