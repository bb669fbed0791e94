"""MeshGEMM: Cannon's cyclic shifting on INTERLEAVE rings, for prefill's C = A @ B.

PE (i, j) of an N x N region owns tiles of A [M, K] (layout y, x), B [K, N] (y, x)
and C. Let rho(p) be position p's rank on the INTERLEAVE ring. At step s, PE (i, j)
must hold A(i, kappa) and B(kappa, j) for the same kappa = order[rho(i) + rho(j) + s]:
- B is pre-skewed when it is placed (weights are placed once): column j starts
  rotated by rho(j) ring steps (``place_b``).
- A is skewed on the mesh: row i is rotated by rho(i) ring steps, which the ring
  does in at most floor(N/2) rounds since a line may turn either way.
- Each of the N steps multiplies the current tiles while the next ones travel one ring
  position (at most 2 hops): step time = max(compute, shift) + step overhead. After N
  steps every operand is back where it started, so a skewed A can be reused by the
  next GEMM that shares it (Q, K, V; gate, up) and B stays placed.
With ``ring="plain"`` the same code is Cannon on a mesh (its wrap-around is N-1 hops).
A block-quantised B (int8 / int4 with fp16 block scales) travels at its stored size and
is dequantised by each PE, every step, for the tile it multiplies.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from waferllm.errors import MeshError
from waferllm.kernels.report import KernelResult, measured
from waferllm.mesh import comm
from waferllm.mesh.compute import matmul_tiles
from waferllm.mesh.interleave import ring_order, ring_rank, ring_source
from waferllm.hardware.plmr import DTYPE_BYTES
from waferllm.mesh.tensor import NP_DTYPES, QUANT_BITS, DistTensor, QuantTensor


def _square(mesh, algo):
    if mesh.rows != mesh.cols:
        raise MeshError(f"{algo} runs on a square region; got {mesh.rows}x{mesh.cols} (use a square sub-region)")
    return mesh.rows


def ring_routes(n: int) -> int:
    """Routes one ring needs through a PE: send and receive, plus a pass-through on rings
    of 3 or more (the 2-hop INTERLEAVE links and the plain ring's wrap cross a PE)."""
    return 0 if n <= 1 else 2 if n == 2 else 3


def skew_rounds(n: int, ring: str = "interleave") -> int:
    """Rounds the on-mesh skew of A takes: the slowest line turns min(k, n-k) positions."""
    k = np.asarray(ring_rank(n, ring)) % n
    return int(np.minimum(k, n - k).max()) if n > 1 else 0


@lru_cache(maxsize=64)
def _skew_kappa(n: int, ring: str) -> np.ndarray:
    order = np.asarray(ring_order(n, ring))
    rho = ring_rank(n, ring)
    kappa = order[(rho[:, None] + rho[None, :]) % n]
    kappa.setflags(write=False)
    return kappa


def skew_blocks(n: int, ring: str, operand: str) -> dict:
    """Block map of a pre-skewed operand: which logical block each PE holds."""
    kappa = _skew_kappa(n, ring)
    ii, jj = np.broadcast_to(np.arange(n)[:, None], (n, n)), np.broadcast_to(np.arange(n)[None, :], (n, n))
    return {0: kappa, 1: jj} if operand == "B" else {0: ii, 1: kappa}


def place_b(mesh, b, dtype="fp16", ring="interleave", name="B", *, scales=None, compute_dtype="fp16",
            scale_slots=0) -> DistTensor:
    """Place a weight [K, N] pre-skewed for MeshGEMM (placement itself is not charged).

    With ``dtype`` int8 or int4 the weight is stored block-quantised (a :class:`QuantTensor`):
    ``b`` its integers, ``scales`` every value's fp16 scale, ``scale_slots`` the block scales
    a tile column keeps, dequantised into ``compute_dtype`` by every product."""
    n = _square(mesh, "MeshGEMM")
    if dtype in QUANT_BITS:
        return QuantTensor.from_global(mesh, b, ("y", "x"), dtype, scales=scales, compute_dtype=compute_dtype,
                                       scale_slots=scale_slots, name=name, blocks=skew_blocks(n, ring, "B"))
    return mesh.place(b, ("y", "x"), dtype, name=name, blocks=skew_blocks(n, ring, "B"))


def skew_a(a: DistTensor, ring: str = "interleave", name="skew_A") -> DistTensor:
    """Rotate row i of A by rho(i) ring positions (at most floor(N/2) rounds)."""
    n = _square(a.mesh, "MeshGEMM")
    rho = ring_rank(n, ring)
    return comm.ring_shift(a, "x", -rho, ring=ring, name=name)


def skew_b(b: DistTensor, ring: str = "interleave", name="skew_B") -> DistTensor:
    """Rotate column j of B by rho(j) ring positions: what ``place_b`` does at placement,
    done on the mesh for a B that is an activation (e.g. V in P V)."""
    n = _square(b.mesh, "MeshGEMM")
    rho = ring_rank(n, ring)
    return comm.ring_shift(b, "y", -rho, ring=ring, name=name)


def cannon_schedule(mesh, operands: list, local, *, algo: str, steps: int, ring: str = "interleave",
                    names=("A", "B"), shift_a=None, shift_b=None, replay_steps: bool = True):
    """Cannon's ``steps`` steps on skewed operands (MeshGEMM, Cannon, grouped P V, the folded
    grid of :func:`meshgemm_rect`): each step's product ``local(a, b)`` (which charges it)
    runs while the next tiles travel one ring position, A along its row ring and B along its
    column ring on disjoint links (double buffering), then the fixed per-step overhead.
    Step time = max(compute, transfer) + overhead. The shifts default to
    :func:`comm.ring_shift` on ``ring``; ``shift_a``/``shift_b`` replace them for operands
    that are not tensors of the mesh. ``operands`` = [a, b] is emptied: the schedule holds
    the only references, so a tile shifted away is freed at once. Returns (a, b) after the
    last shift (home again after a full turn of the ring). In a dry run (``replay_steps``)
    the first step is executed and the others, identical in cost, are replayed."""
    a, b = operands
    operands.clear()
    if shift_a is None:
        def shift_a(t):
            return comm.ring_shift(t, "x", -1, ring=ring, name=f"{algo}.shift_{names[0]}")
    if shift_b is None:
        def shift_b(t):
            return comm.ring_shift(t, "y", -1, ring=ring, name=f"{algo}.shift_{names[1]}")
    def step(a, b):
        with mesh.ledger.overlap():
            local(a, b)
            with mesh.ledger.concurrent():  # A on row links, B on column links
                a = shift_a(a)
                b_next = shift_b(b)
        mesh.ledger.charge(f"{algo}.step", "overhead", mesh.wafer.step_overhead_cycles)
        return a, b_next

    # each operand rotates through its own space plus one receive buffer; a full turn of
    # the ring brings it home, to the very tiles it started from
    home = (a, b)
    with mesh.sram.lent(a, b):
        if not mesh.numeric and steps > 2 and replay_steps:
            # Shapes only: every step moves the same tiles the same distance and multiplies
            # the same tile shapes, so from the second one on (both buffers in use) each
            # costs what the second did.
            a, b = step(a, b)
            a, b = run_and_replay(mesh, lambda: step(a, b), steps - 2, f"{algo}.steps (replayed)")
        else:
            for _ in range(steps):
                a, b = step(a, b)
        del a, b  # the last receive buffers: the operands are home
    return home


def scaled_delta(delta: dict, times: int) -> dict:
    """A ledger delta charged ``times`` times over (its numbers and per-primitive cycles)."""
    return {k: ({n: c * times for n, c in v.items()} if isinstance(v, dict) else v * times)
            for k, v in delta.items()}


def run_and_replay(mesh, run, times: int, label: str):
    """``run()``, measured on the ledger, then its cost charged ``times`` more times as
    ``label``: for a dry run's steps that cost alike (the same tiles, the same moves), each
    replayed step is what an executed one earned. Returns what ``run`` returned."""
    mark = mesh.ledger.mark(per_primitive=True)
    out = run()
    mesh.ledger.replay(scaled_delta(mesh.ledger.since(mark), times), label)
    return out


def meshgemm(a: DistTensor, b: DistTensor, *, ring: str = "interleave", a_skewed: bool = False,
             out_dtype: str | None = None, algo: str | None = None, name: str = "C") -> KernelResult:
    """C = A @ B with A [M, K] (y, x) and B [K, N] (y, x) pre-skewed by :func:`place_b`.

    Pass ``a_skewed=True`` with the ``state["a_skewed"]`` of a previous call to reuse
    its skew. The result C [M, N] has layout (y, x) in the plain block order.
    """
    mesh = a.mesh
    n = _square(mesh, "MeshGEMM")
    algo = algo or ("meshgemm" if ring == "interleave" else "cannon")
    if a.layout != ("y", "x") or b.layout != ("y", "x"):
        raise MeshError(f"{algo}: A and B need layout (y, x); got {a.layout}, {b.layout}")
    if a.shape[1] != b.shape[0]:
        raise MeshError(f"{algo}: inner dims differ: A {a.shape} x B {b.shape}")
    out_dtype = out_dtype or a.dtype
    m_t, k_t = a.tile_shape
    n_t = b.tile_shape[1]
    if b.tile_shape[0] != k_t:
        raise MeshError(f"{algo}: tile K sizes differ ({k_t} vs {b.tile_shape[0]})")
    # three routes per ring (send, receive, pass-through), one ring per operand
    with measured(mesh, algo) as rep, mesh.sram.lent(b):
        # two rings held for the whole kernel; B rotates through its own placed space
        # plus one receive buffer
        mesh.routes.request(f"{algo}.rings[{ring}]", 2 * ring_routes(n), relayable=False)
        a, b = a.compute_view(), b.compute_view()
        if not a_skewed:
            a = skew_a(a, ring)
        skewed = a
        acc = mesh.zeros((a.shape[0], b.shape[1]), ("y", "x"), "fp32", name=f"{name}_acc")
        acc_tiles = acc.tiles  # the products accumulate into it in place

        def local(a_, b_):
            # a block-quantised B: each step the PE dequantises the tile it just received
            matmul_tiles(mesh, a_.tiles, b_.tiles, acc_tiles, dtype=a_.dtype, name=f"{algo}.tile_matmul",
                         shapes=(m_t, k_t, n_t), dequant=b_ if isinstance(b_, QuantTensor) else None)

        # the N-th shift brings every operand home
        a, b = cannon_schedule(mesh, [a, b], local, algo=algo, steps=n, ring=ring)
        out = DistTensor(mesh, (a.shape[0], b.shape[1]), ("y", "x"), out_dtype,
                         None if acc_tiles is None else acc_tiles.astype(NP_DTYPES[out_dtype]), name=name)
        del acc
    rep.extra.update(m=a.shape[0], k=a.shape[1], n=b.shape[1], grid=n, skew_rounds=skew_rounds(n, ring))
    # after N steps B is home again: the caller's placed B stays the operand of record
    return KernelResult(out, rep, {"a_skewed": skewed})


# ---------------------------------------------------------------- non-square regions
#
# SPEC: "Non-square meshes: work on the N_lcm x N_lcm logical grid (lcm of the sides)".
# An R x C region runs MeshGEMM on an L x L logical grid, L = lcm(R, C), by *folding*:
# physical PE (p, q) emulates the fr x fc logical PEs (p*fr + u, q*fc + v), fr = L/R,
# fc = L/C. Logical tiles are ceil(M/L) x ceil(K/L) (A), ceil(K/L) x ceil(N/L) (B), so a
# physical PE's share of every operand is a contiguous fr x fc block of logical tiles:
# the ordinary (y, x) block layout with a tile of (fr*mt, fc*kt).
#
# Cost per physical PE (vectorised: every PE alike, the busiest one sets the time):
# - compute: each step, the sum of its fr*fc logical tile products (one op each);
# - a logical ring step along x moves every logical tile one INTERLEAVE position (at
#   most 2 logical positions). Tiles whose neighbour is emulated by the same PE stay
#   put; the others leave through the PE's one ramp, so the message body is the bytes
#   of *all* its logical tiles that leave (fr rows of them for A), and the head pays the
#   physical hops of the farthest one (2 when fc == 1, else 1). Every logical boundary
#   is crossed by one flow per direction per logical line, so a physical link never
#   carries more than the ramp does;
# - the skew of A: round t moves the logical rows whose offset needs >= t rounds;
# - routes: 3 per ring when the fold is 1 (send, receive, pass-through, as on a square
#   region), 4 when it is >= 2 (send and receive in each direction, no pass-through).
# On a square region (fr = fc = 1) this charges exactly what :func:`meshgemm` charges.


def _fold_ring(n_logical: int, fold: int, ring: str) -> tuple[int, int]:
    """(max tiles of one logical line leaving a physical PE per ring step, max physical hops)."""
    from waferllm.mesh.interleave import ring_next

    if n_logical <= 1:
        return 0, 0
    pos = np.arange(n_logical)
    nxt = ring_next(n_logical, ring)  # same count for either direction round the ring
    src_pe, dst_pe = pos // fold, nxt // fold
    leaving = np.bincount(src_pe[src_pe != dst_pe], minlength=n_logical // fold)
    hops = int(np.abs(dst_pe - src_pe).max())
    return int(leaving.max()) if leaving.size else 0, hops


def _fold(x, r, c, fr, fc):
    """(L, L, *tile) logical tiles -> (fr, fc, R, C, *tile): sub-position (u, v) of every PE."""
    t = x.shape[2:]
    return x.reshape(r, fr, c, fc, *t).transpose(1, 3, 0, 2, *range(4, 4 + len(t)))


def _physical(x, r, c, fr, fc):
    """(L, L, a, b) logical tiles -> (R, C, fr*a, fc*b): each PE's contiguous block."""
    a, b = x.shape[2:]
    return x.reshape(r, fr, c, fc, a, b).transpose(0, 2, 1, 4, 3, 5).reshape(r, c, fr * a, fc * b)


def _logical_tiles(arr, L, tile):
    """Host [rows, cols] -> (L, L, *tile) logical tiles, zero-padded."""
    mt, nt = tile
    pad = np.zeros((L * mt, L * nt), arr.dtype)
    pad[:arr.shape[0], :arr.shape[1]] = arr
    return np.ascontiguousarray(pad.reshape(L, mt, L, nt).transpose(0, 2, 1, 3))


def meshgemm_rect(mesh, a, b, *, dtype: str = "fp16", ring: str = "interleave", out_dtype: str | None = None,
                  algo: str | None = None, name: str = "C") -> KernelResult:
    """C = A @ B on any R x C region by folding the lcm(R, C)-square logical grid (see above).

    ``a`` [M, K] and ``b`` [K, N] are host arrays (numeric mesh) or shape tuples (dry
    run); they are placed here (A plain, B pre-skewed for the logical grid; placement is
    not charged). Returns C [M, N] with layout (y, x) on the physical region.

    (One long function on purpose: the fold's index maps, the skew, the steps and the
    numerics all read the same fold state; split up, a dozen locals would be threaded
    through every helper.)
    """
    algo = algo or ("meshgemm" if ring == "interleave" else "cannon")
    if ring not in ("interleave", "plain"):
        raise MeshError(f"{algo}: ring must be 'interleave' or 'plain', got {ring!r}")
    if dtype not in NP_DTYPES:
        raise MeshError(f"{algo}: dtype must be fp16 or fp32, got {dtype!r}")
    a_shape = tuple(a) if isinstance(a, tuple) else tuple(np.shape(a))
    b_shape = tuple(b) if isinstance(b, tuple) else tuple(np.shape(b))
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
        raise MeshError(f"{algo}: need A [M, K] and B [K, N] with equal K; got {a_shape} and {b_shape}")
    numeric = mesh.numeric
    if numeric and (isinstance(a, tuple) or isinstance(b, tuple)):
        raise MeshError(f"{algo}: a numeric mesh needs host arrays, not shapes")
    out_dtype = out_dtype or dtype
    R, C = mesh.shape
    L = math.lcm(R, C)
    fr, fc = L // R, L // C
    M, K = a_shape
    N = b_shape[1]
    mt, kt, nt = math.ceil(M / L), math.ceil(K / L), math.ceil(N / L)
    item = DTYPE_BYTES[dtype]
    order = np.asarray(ring_order(L, ring))
    rho = ring_rank(L, ring)
    lx, hx = _fold_ring(L, fc, ring)  # A moves along logical rows (x), folded by fc
    ly, hy = _fold_ring(L, fr, ring)  # B moves along logical columns (y), folded by fr
    a_bytes, b_bytes = fr * lx * mt * kt * item, fc * ly * kt * nt * item
    routes = lambda fold, n_log: 0 if n_log // fold <= 1 else (3 if fold == 1 else 4)  # noqa: E731
    routes_pe = routes(fc, L) + routes(fr, L)

    def phys_tensor(shape, tiles, tshape, dt, nm):
        return DistTensor(mesh, shape, ("y", "x"), dt, tiles, name=nm, tile_shape=tshape)

    a_log = b_log = None
    if numeric:
        a_log = _logical_tiles(np.asarray(a, dtype=NP_DTYPES[dtype]), L, (mt, kt))
        b_log = _logical_tiles(np.asarray(b, dtype=NP_DTYPES[dtype]), L, (kt, nt))
        ii, jj = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
        b_log = b_log[order[(rho[ii] + rho[jj]) % L], jj]  # pre-skewed at placement
    a_t = phys_tensor((M, K), None if a_log is None else _physical(a_log, R, C, fr, fc), (fr * mt, fc * kt), dtype, "A")
    b_t = phys_tensor((K, N), None if b_log is None else _physical(b_log, R, C, fr, fc), (fr * kt, fc * nt), dtype, "B")

    def ring_step(nbytes, hops, label, axis):
        """Every PE sends the logical tiles that leave it for the next ring position."""
        if nbytes > 0:
            comm.charge_messages(mesh, label, nbytes, hops, axis=axis, routes=routes_pe)

    with measured(mesh, algo) as rep:
        if routes_pe:  # both rings, held for the whole kernel
            mesh.routes.request(f"{algo}.rings[{ring}]", routes_pe, relayable=False)
        # ---- skew A: logical row li turns by rho(li) positions, min(k, L-k) rounds
        need = np.minimum(rho, L - rho)  # rounds of each logical row
        skew_rounds = int(need.max()) if L > 1 else 0
        if skew_rounds and lx:
            per_pe = need.reshape(R, fr)
            for t in range(1, skew_rounds + 1):  # round t: the logical rows that still turn
                ring_step(int((per_pe >= t).sum(axis=1).max()) * lx * mt * kt * item, hx, f"{algo}.skew_A", "x")
        if numeric:
            a_log = a_log[ii, order[(rho[ii] + rho[jj]) % L]]
        skewed = phys_tensor((M, K), None if a_log is None else _physical(a_log, R, C, fr, fc),
                             (fr * mt, fc * kt), dtype, "A_skewed")
        acc = np.zeros((L, L, mt, nt), np.float32) if numeric else None
        acc_h = mesh.sram.alloc(f"{name}_acc", fr * fc * mt * nt * 4)
        src_x = ring_source(L, ring, -1) if L > 1 else np.zeros(1, np.int64)
        fo = None if acc is None else _fold(acc, R, C, fr, fc)  # views of acc: products accumulate in place

        def local(a_l, b_l):
            fa = None if a_l is None else _fold(a_l, R, C, fr, fc)
            fb = None if b_l is None else _fold(b_l, R, C, fr, fc)
            for u in range(fr):
                for v in range(fc):
                    matmul_tiles(mesh, None if fa is None else fa[u, v], None if fb is None else fb[u, v],
                                 None if fo is None else fo[u, v], dtype=dtype,
                                 name=f"{algo}.tile_matmul", shapes=(mt, kt, nt))

        def shift_a(a_l):  # one logical position along the rows (x)
            ring_step(a_bytes, hx, f"{algo}.shift_A", "x")
            return a_l[:, src_x] if a_l is not None and L > 1 else a_l

        def shift_b(b_l):  # and along the columns (y)
            ring_step(b_bytes, hy, f"{algo}.shift_B", "y")
            return b_l[src_x] if b_l is not None and L > 1 else b_l

        nxt_h = mesh.sram.alloc(f"{algo}.next_tiles", (fr * fc * (mt * kt + kt * nt)) * item)  # receive buffers
        cannon_schedule(mesh, [a_log, b_log], local, algo=algo, steps=L, shift_a=shift_a, shift_b=shift_b)
        mesh.sram.free(nxt_h)
        out = phys_tensor((M, N), None if acc is None else _physical(acc, R, C, fr, fc).astype(NP_DTYPES[out_dtype]),
                          (fr * mt, fc * nt), out_dtype, name)
        mesh.sram.free(acc_h)
        del skewed
    rep.extra.update(m=M, k=K, n=N, grid=f"{R}x{C}", logical_grid=L, fold=(fr, fc), skew_rounds=skew_rounds)
    return KernelResult(out, rep, {"a": a_t, "b": b_t})
