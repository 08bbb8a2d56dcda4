"""Voxelization on a CUDA device with numba.cuda kernels.

The same algorithm as `cpu.py`, arranged for a GPU so that one call is three kernels
(two without labels), a device sort and one host sync:

    K1 `_k_insert`   per point: float64 key (same steps, same order as the CPU), insert
                     into an open-addressing hash table of int64 keys with `atomic.cas`,
                     the first inserter of a key appends it to a compact list (block-
                     aggregated, so the global counter sees one atomic per block), and the
                     point's sums go straight into per-SLOT accumulators (count, offset
                     sums, feature sums in float64; atomicMin of the bits of |r|^2).
    K2 `_k_ties`     per point (labels only): second pass of the AnoVox rule. Among the
                     points whose |r|^2 equals the voxel's minimum, atomicMin of
                     `index << 32 | tag`, so the lowest index wins a tie exactly as on the
                     CPU; a road-line point atomicMins a negative value and so always wins.
    host sync        read M (the number of voxels) to size the outputs: the only one (torch
                     ops below are asynchronous; n_nonfinite / n_outside stay on the device).
    sort             the M unique keys (torch.sort), then the inverse permutation.
    K3 `_k_finalize` per voxel row: key, coords, count, means, label; it also resets the
                     slots it used, so the table stays clean for the next call without a
                     memset over the whole table. Per point (same launch): point2voxel.

Bit-for-bit agreement with the CPU: keys use the same float64 operations in the same
order (an add, an IEEE division, floor). The remainder and |r|^2 use libdevice's
`dmul_rn`/`dadd_rn`, because NVVM contracts `a*a + b*b` into a fused multiply-add by default
(checked in PTX), which rounds differently from the CPU. Per-voxel float64 sums are
accumulated in another order than on the CPU; after the division and the cast to float32
this gives the same float32 except when the float64 mean falls within ~1e-16 (relative)
of a float32 rounding boundary.

Few arrays per launch: numba spends ~11 us of host time per array argument of a launch and
~19 us per torch tensor it wraps (H100 machine, session 2), which made the call host-bound
(~1.8 ms at any N). So the work buffers are packed by dtype into a handful of arrays (rows
of `slot64`, `slot32`, `pt32`), the kernels read xyz and features from the one points array,
K3 takes the key of a row from the hash table instead of a sorted copy, and the outputs of a
call are three flat arrays (int64, int32, float32) whose contiguous slices become the result:
20 array arguments over the three launches and 5-6 wrapped tensors per call, instead of 37
and 14.

torch tensors reach numba as zero-copy views (`cuda.as_cuda_array(t, sync=False)`); the
`sync=False` skips the stream synchronisation numba otherwise does on every import (the
same effect as NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0, which callers that hand torch tensors to
numba themselves should set). Kernels run on torch's current stream.

Under the numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set before numba is imported) the
same kernels run on numpy arrays through `_voxelize_device(..., NumpyBackend())`; that is
how the tests check them against `voxelize_cpu` on a machine without a GPU.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numba import config as numba_config
from numba import cuda

from sparse_ad.errors import SparseADError
from sparse_ad.grid import VoxelGrid
from sparse_ad.tags import ROAD_LINE
from sparse_ad.voxelize import check_labels
from sparse_ad.voxelize.cpu import table_capacity
from sparse_ad.voxelize.result import Voxels

SIMULATOR = bool(numba_config.ENABLE_CUDASIM)

EMPTY = np.int64(-1)                 # free hash-table slot
NONFINITE = np.int64(-1)             # key of a point with a NaN/inf coordinate
OUTSIDE = np.int64(-2)               # key of a finite point outside the grid
I64_MAX = np.int64(np.iinfo(np.int64).max)
FIB32 = np.uint64(0x9E3779B1)        # 2^32 / golden ratio: multiplicative hashing
LOW32 = np.uint64(0xFFFFFFFF)
MAX_POINTS = 1 << 30                 # slots and rows are int32 (table capacity <= 2^31)


# --- float64 arithmetic that is never fused -------------------------------------------------
if SIMULATOR:
    def _mul(a, b):
        return a * b

    def _add(a, b):
        return a + b

    def _f64_bits(x):
        return np.float64(x).view(np.int64)
else:  # pragma: no cover - needs a GPU
    from numba.cuda import libdevice

    _mul = libdevice.dmul_rn            # explicit rounding: ptxas/NVVM never contract these
    _add = libdevice.dadd_rn
    _f64_bits = libdevice.double_as_longlong


# --- device functions -----------------------------------------------------------------------
@cuda.jit(device=True)
def _grid_key(qx, qy, qz, res, ex, ey, ez, nx, ny, nz):
    """Linear key of an offset point q, or NONFINITE / OUTSIDE (as `cpu.point_key`)."""
    if not (math.isfinite(qx) and math.isfinite(qy) and math.isfinite(qz)):
        return NONFINITE
    if qx < 0.0 or qy < 0.0 or qz < 0.0 or qx >= ex or qy >= ey or qz >= ez:
        return OUTSIDE
    ix = np.int64(math.floor(qx / res))
    iy = np.int64(math.floor(qy / res))
    iz = np.int64(math.floor(qz / res))
    if ix >= nx or iy >= ny or iz >= nz:
        return OUTSIDE
    return ix + iy * nx + iz * nx * ny


@cuda.jit(device=True)
def _remainder(q, res):
    """`q - res * floor(q / res)`, rounded step by step like the CPU."""
    return _add(q, -_mul(res, np.float64(math.floor(q / res))))


@cuda.jit(device=True)
def _r2_bits(rx, ry, rz):
    """Bits of `rx*rx + ry*ry + rz*rz` (>= +0, so int64 order is float order)."""
    return _f64_bits(_add(_add(_mul(rx, rx), _mul(ry, ry)), _mul(rz, rz)))


@cuda.jit(device=True)
def _hash_slot(key, shift):
    """Fibonacci hashing of the key folded to 32 bits. Every product stays below 2^64, so
    the simulator (plain numpy scalars) computes it without overflow warnings."""
    x = np.uint64((key ^ (key >> 32)) & 0xFFFFFFFF)
    return np.int64(((x * FIB32) & LOW32) >> np.uint64(shift))


# --- kernels --------------------------------------------------------------------------------
# Rows of the packed work buffers (one place for the layout; see `_work_buffers`).
TABLE, MINR2, BEST = 0, 1, 2          # slot64 (3, cap) int64: key, min |r|^2 bits, best (index, tag)
COUNT, U_OF_SLOT = 0, 1               # slot32 (2, cap) int32: points, row in the unique-key list
SLOT_OF, USLOT = 0, 1                 # pt32 (2, n) int32: slot of point i, slot of unique key u


@cuda.jit(cache=not SIMULATOR)
def _k_insert(pts, nfeat, has_tags, ox, oy, oz, res, ex, ey, ez, nx, ny, nz, shift, mask,
              slot64, slot32, pt32, ukeys, counters, acc):
    """K1, one thread per point. Block-shared counters turn the global appends and the
    drop counts into one atomic per block (a single hot counter would serialise them)."""
    blk = cuda.shared.array(3, np.int32)       # new keys, non-finite, outside (this block)
    base = cuda.shared.array(1, np.int64)      # this block's first position in ukeys
    table = slot64[TABLE]
    t = cuda.threadIdx.x
    if t == 0:
        blk[0] = 0
        blk[1] = 0
        blk[2] = 0
    cuda.syncthreads()
    i = cuda.grid(1)
    k = OUTSIDE
    s = np.int64(-1)
    local = np.int32(-1)                       # position among this block's new keys
    if i < pts.shape[0]:
        qx = np.float64(pts[i, 0]) + ox
        qy = np.float64(pts[i, 1]) + oy
        qz = np.float64(pts[i, 2]) + oz
        k = _grid_key(qx, qy, qz, res, ex, ey, ez, nx, ny, nz)
        if k == NONFINITE:
            cuda.atomic.add(blk, 1, 1)
        elif k == OUTSIDE:
            cuda.atomic.add(blk, 2, 1)
        else:
            s = _hash_slot(k, shift)
            while True:
                old = cuda.atomic.cas(table, s, EMPTY, k)
                if old == EMPTY:
                    local = cuda.atomic.add(blk, 0, 1)
                    break
                if old == k:
                    break
                s = (s + 1) & mask
            _accumulate(i, s, qx, qy, qz, res, pts, nfeat, has_tags, slot32[COUNT], acc, slot64[MINR2])
        pt32[SLOT_OF, i] = s
    cuda.syncthreads()
    if t == 0:
        base[0] = cuda.atomic.add(counters, 0, np.int64(blk[0]))
        if blk[1] > 0:
            cuda.atomic.add(counters, 1, np.int64(blk[1]))
        if blk[2] > 0:
            cuda.atomic.add(counters, 2, np.int64(blk[2]))
    cuda.syncthreads()
    if local >= 0:
        u = base[0] + local
        ukeys[u] = k
        pt32[USLOT, u] = s
        slot32[U_OF_SLOT, s] = u


@cuda.jit(device=True)
def _accumulate(i, s, qx, qy, qz, res, pts, nfeat, has_tags, count, acc, minr2):
    """Add point i to slot s: count, offset from the voxel centre, features, min |r|^2."""
    cuda.atomic.add(count, s, 1)
    half = _mul(0.5, res)                  # exact; _mul only so nothing can fuse with it
    rx = _remainder(qx, res)
    ry = _remainder(qy, res)
    rz = _remainder(qz, res)
    cuda.atomic.add(acc, (s, 0), rx - half)
    cuda.atomic.add(acc, (s, 1), ry - half)
    cuda.atomic.add(acc, (s, 2), rz - half)
    for j in range(nfeat):
        cuda.atomic.add(acc, (s, 3 + j), np.float64(pts[i, 3 + j]))
    if has_tags:
        cuda.atomic.min(minr2, s, _r2_bits(rx, ry, rz))


@cuda.jit(cache=not SIMULATOR)
def _k_ties(pts, tags, ox, oy, oz, res, road_line, road_pack, pt32, slot64):
    """K2, one thread per point: the AnoVox rule's second pass (see the module doc)."""
    i = cuda.grid(1)
    if i >= pts.shape[0]:
        return
    s = pt32[SLOT_OF, i]
    if s < 0:
        return
    best = slot64[BEST]
    tag = tags[i]
    if tag == road_line:
        cuda.atomic.min(best, s, road_pack)
        return
    qx = np.float64(pts[i, 0]) + ox
    qy = np.float64(pts[i, 1]) + oy
    qz = np.float64(pts[i, 2]) + oz
    bits = _r2_bits(_remainder(qx, res), _remainder(qy, res), _remainder(qz, res))
    if bits == slot64[MINR2, s]:
        cuda.atomic.min(best, s, (np.int64(i) << 32) | (np.int64(tag) & 0xFFFFFFFF))


@cuda.jit(cache=not SIMULATOR)
def _k_finalize(m, n, nfeat, has_tags, nx, ny, order, pt32, slot64, slot32, acc, counters, out64, out32, outf):
    """K3 over max(N, M) threads: thread r < M writes voxel row r and frees its slot;
    thread i < N writes point i's row. Thread 0 moves the drop counters to the stats and
    zeroes them for the next call. `order` = (perm, inv) of the sorted unique keys; the
    flat outputs are laid out as in `_Outputs`."""
    i = cuda.grid(1)
    if i == 0:
        out64[m + n] = counters[1]
        out64[m + n + 1] = counters[2]
        counters[0] = 0
        counters[1] = 0
        counters[2] = 0
    if i < m:
        _finalize_row(i, m, nfeat, has_tags, nx, ny, order, pt32, slot64, slot32, acc, out64, out32, outf)
    if i < n:
        s = pt32[SLOT_OF, i]
        out64[m + i] = -1 if s < 0 else order[1, slot32[U_OF_SLOT, s]]


@cuda.jit(device=True)
def _finalize_row(r, m, nfeat, has_tags, nx, ny, order, pt32, slot64, slot32, acc, out64, out32, outf):
    """Row r of every per-voxel output from the slot of the r-th smallest key (whose key the
    table holds), then the slot back to its initial state."""
    s = pt32[USLOT, order[0, r]]
    k = slot64[TABLE, s]
    out64[r] = k
    out32[3 * r] = k % nx
    out32[3 * r + 1] = (k // nx) % ny
    out32[3 * r + 2] = k // (nx * ny)
    c = slot32[COUNT, s]
    out32[3 * m + r] = c
    inv = 1.0 / np.float64(c)
    for j in range(3):
        outf[3 * r + j] = _mul(acc[s, j], inv)
        acc[s, j] = 0.0
    for j in range(nfeat):
        outf[3 * m + r * nfeat + j] = _mul(acc[s, 3 + j], inv)
        acc[s, 3 + j] = 0.0
    if has_tags:
        low = slot64[BEST, s] & 0xFFFFFFFF   # the tag, stored as its low 32 bits
        if low >= 0x80000000:
            low -= 0x100000000
        out32[4 * m + r] = low
        slot64[BEST, s] = I64_MAX
        slot64[MINR2, s] = I64_MAX
    slot32[COUNT, s] = 0
    slot64[TABLE, s] = EMPTY


# --- backends: where arrays live ------------------------------------------------------------
class _Backend:
    """Where arrays live and how kernels are launched; subclasses supply the arrays."""

    threads = 256
    stream = 0

    def launch(self, kernel, nthreads: int):
        """`kernel[grid, block, stream]` covering `nthreads` threads (at least one block)."""
        blocks = max(1, -(-nthreads // self.threads))
        return kernel[blocks, self.threads, self.stream]


class NumpyBackend(_Backend):
    """Host numpy arrays: for the CUDA simulator (and, slowly, a real GPU with implicit
    copies). `threads` is small so that a few hundred points span several blocks."""

    def __init__(self, threads: int = 32):
        self.threads = threads
        self.scratch = _Scratch(self)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def full(self, shape, value, dtype):
        return np.full(shape, value, dtype)

    def fill(self, arr, value):
        arr[...] = value

    def view(self, arr):
        """Kernels get contiguous arrays (numba copies numpy arguments as one block); an
        array that already is contiguous is passed as itself, so kernel writes land in it."""
        return np.ascontiguousarray(arr)

    def read_count(self, counters) -> int:
        return int(counters[0])

    def order(self, keys, out) -> None:
        """out[0] = the permutation that sorts `keys`, out[1] = its inverse."""
        out[0] = np.argsort(keys, kind="stable")
        out[1][out[0]] = np.arange(keys.shape[0])


class TorchBackend(_Backend):
    """torch CUDA tensors on one device and stream; numba sees zero-copy views."""

    def __init__(self, device, torch_stream):  # pragma: no cover - needs a GPU
        import torch

        self.torch = torch
        self.device = device
        self.torch_stream = torch_stream
        self.stream = cuda.external_stream(torch_stream.cuda_stream)
        self.scratch = _Scratch(self)

    def _dtype(self, dtype):
        return getattr(self.torch, np.dtype(dtype).name)

    def empty(self, shape, dtype):
        return self.torch.empty(_shape(shape), dtype=self._dtype(dtype), device=self.device)

    def full(self, shape, value, dtype):
        return self.torch.full(_shape(shape), value, dtype=self._dtype(dtype), device=self.device)

    def fill(self, arr, value):
        arr.fill_(value)

    def view(self, arr):  # pragma: no cover - needs a GPU
        return cuda.as_cuda_array(arr, sync=False)

    def read_count(self, counters) -> int:
        return int(counters[0].item())      # the one host sync of a call

    def order(self, keys, out) -> None:
        self.torch.sort(keys, out=(self.torch.empty_like(keys), out[0]))
        out[1].scatter_(0, out[0], self.torch.arange(keys.shape[0], device=self.device))


class _Scratch:
    """Grow-only work buffers of one backend, reused across calls.

    The slot-indexed buffers (slot64, slot32's count row, acc) and the counters are left in
    their initial state by every call: `_k_finalize` resets exactly the slots it used, so a
    call needs no memset over the whole table (which would cost as much as the insertion
    itself). `dirty` marks a call that stopped between K1 and K3; the next call then
    re-initialises them.
    """

    # initial value of each row (a 1-D buffer: one value); rows without one need none
    INIT = {"slot64": (EMPTY, I64_MAX, I64_MAX), "slot32": (0, None), "acc": (0.0,), "counters": (0,)}

    def __init__(self, backend):
        self.backend = backend
        self.arrays = {}            # name -> (backend array, kernel view, numpy dtype)
        self.dirty = False

    def get(self, name, length, dtype, rows=0, cols=0):
        """Kernel view of buffer `name`: (rows, >= length) if rows, else (>= length, >= cols)
        if cols, else (>= length,). The hit path is a few comparisons."""
        dtype = np.dtype(dtype)
        axis = 1 if rows else 0
        have = self.arrays.get(name)
        if have is not None:
            arr, view, have_dtype = have
            if arr.shape[axis] >= length and have_dtype == dtype and (cols == 0 or arr.shape[1] >= cols):
                return view
            length = max(length, arr.shape[axis])
        length = max(1024, 1 << (int(length) - 1).bit_length())
        shape = (rows, length) if rows else (length, cols) if cols else (length,)
        arr = self.backend.empty(shape, dtype)
        self.arrays[name] = (arr, self.backend.view(arr), dtype)
        self._init(name)
        return self.arrays[name][1]

    def array(self, name):
        return self.arrays[name][0]

    def _init(self, name) -> None:
        arr, values = self.arrays[name][0], self.INIT.get(name)
        if values is None:
            return
        if len(values) == 1:
            self.backend.fill(arr, values[0])
            return
        for row, value in enumerate(values):
            if value is not None:
                self.backend.fill(arr[row], value)

    def reset(self):
        for name in self.INIT:
            if name in self.arrays:
                self._init(name)
        self.dirty = False


def _shape(shape) -> tuple:
    return (int(shape),) if np.ndim(shape) == 0 else tuple(int(v) for v in shape)


# --- the algorithm ---------------------------------------------------------------------------
def _voxelize_device(points, tags, grid: VoxelGrid, backend) -> Voxels:
    """Voxelize with the CUDA kernels; arrays are the backend's (numpy or torch CUDA).

    points (N, 3+C) float (xyz, then C feature columns; any strides), tags (N,) int32 or
    None. Returns `Voxels` whose arrays are the backend's; n_nonfinite / n_outside are 0-d
    arrays (no host read).
    """
    n, c = int(points.shape[0]), int(points.shape[1]) - 3
    has_tags = tags is not None
    if n > MAX_POINTS:
        raise SparseADError(f"voxelize_cuda takes at most {MAX_POINTS} points per call, got {n}; "
                            "split the cloud")
    out = _Outputs(backend, n, c, has_tags)
    if n == 0:
        out.allocate(0)
        return out.result(0)
    sc = backend.scratch
    if sc.dirty:
        sc.reset()
    cap = table_capacity(n)
    w = _work_buffers(sc, n, cap, c, grid)
    kp = backend.view(points)
    (ox, oy, oz), (ex, ey, ez), (nx, ny, nz) = grid.offset, grid.extent, grid.shape
    res = grid.resolution
    sc.dirty = True
    backend.launch(_k_insert, n)(
        kp, c, has_tags, ox, oy, oz, res, ex, ey, ez, nx, ny, nz, 32 - (cap.bit_length() - 1), cap - 1,
        w["slot64"], w["slot32"], w["pt32"], w["ukeys"], w["counters"], w["acc"])
    if has_tags:
        backend.launch(_k_ties, n)(kp, backend.view(tags), ox, oy, oz, res, ROAD_LINE, _road_pack(), w["pt32"],
                                   w["slot64"])
    m = backend.read_count(sc.array("counters"))          # the host sync: M sizes the outputs
    if m > 0:
        order = backend.empty((2, m), np.int64)
        backend.order(sc.array(_ukeys_name(grid))[:m], order)
        order = backend.view(order)
    else:
        order = sc.get("dummy_order", 1, np.int64, rows=2)
    out.allocate(m)
    backend.launch(_k_finalize, max(n, m))(
        m, n, c, has_tags, nx, ny, order, w["pt32"], w["slot64"], w["slot32"], w["acc"], w["counters"],
        *out.views())
    sc.dirty = False
    return out.result(m)


def _ukeys_name(grid: VoxelGrid) -> str:
    """Unique keys are sorted as int32 when the grid allows: half the radix-sort passes."""
    return "ukeys32" if grid.num_voxels <= np.iinfo(np.int32).max else "ukeys64"


def _work_buffers(sc: _Scratch, n: int, cap: int, c: int, grid: VoxelGrid) -> dict:
    """Kernel views of the scratch buffers for N points and a table of `cap` slots; rows as
    named by TABLE, MINR2, BEST (slot64), COUNT, U_OF_SLOT (slot32), SLOT_OF, USLOT (pt32)."""
    name = _ukeys_name(grid)
    return {
        "slot64": sc.get("slot64", cap, np.int64, rows=3),
        "slot32": sc.get("slot32", cap, np.int32, rows=2),
        "acc": sc.get("acc", cap, np.float64, cols=3 + c),
        "pt32": sc.get("pt32", n, np.int32, rows=2),
        "ukeys": sc.get(name, n, np.int32 if name == "ukeys32" else np.int64),
        "counters": sc.get("counters", 3, np.int64),
    }


class _Outputs:
    """The result arrays of one call, as contiguous slices of three flat arrays (one wrapped
    view and one kernel argument per dtype, see the module doc):

        out64  keys [0, M) | point2voxel [M, M+N) | n_nonfinite, n_outside [M+N, M+N+2)
        out32  coords [0, 3M) | counts [3M, 4M) | labels [4M, 5M)
        outf   offsets [0, 3M) | features [3M, 3M + C*M)

    They are sized for max(M, 1) voxels, so no kernel ever sees an empty array."""

    def __init__(self, backend, n: int, c: int, has_tags: bool):
        self.backend, self.n, self.c, self.has_tags = backend, n, c, has_tags

    def allocate(self, m: int) -> None:
        b, rows = self.backend, max(m, 1)
        self.m = m
        # with no points nothing runs, so the drop counters must start at zero
        self.out64 = b.empty(m + self.n + 2, np.int64) if self.n else b.full(2, 0, np.int64)
        self.out32 = b.empty(rows * (5 if self.has_tags else 4), np.int32)
        self.outf = b.empty(rows * (3 + self.c), np.float32)

    def views(self) -> list:
        """Kernel views in `_k_finalize`'s argument order."""
        return [self.backend.view(a) for a in (self.out64, self.out32, self.outf)]

    def result(self, m: int) -> Voxels:
        n, c = self.n, self.c
        o64, o32, of = self.out64, self.out32, self.outf
        return Voxels(coords=o32[:3 * m].reshape(m, 3), keys=o64[:m], point2voxel=o64[m:m + n],
                      features=of[3 * m:3 * m + c * m].reshape(m, c), counts=o32[3 * m:4 * m],
                      offsets=of[:3 * m].reshape(m, 3), labels=o32[4 * m:5 * m] if self.has_tags else None,
                      n_nonfinite=o64[m + n], n_outside=o64[m + n + 1])


def _road_pack() -> int:
    """`best` value of a road-line point: below every `index << 32 | tag`, low word = 24."""
    return (-1 << 32) | (ROAD_LINE & 0xFFFFFFFF)


# --- public torch entry point ----------------------------------------------------------------
_BACKENDS = threading.local()


def _torch_backend(device):  # pragma: no cover - needs a GPU
    """One backend (and scratch) per thread, device and stream: scratch buffers must not be
    shared by work that can run concurrently."""
    import torch

    stream = torch.cuda.current_stream(device)
    cache = getattr(_BACKENDS, "cache", None)
    if cache is None:
        cache = _BACKENDS.cache = {}
    key = (device.index, stream.cuda_stream)
    if key not in cache:
        cache[key] = TorchBackend(device, stream)
    return cache[key]


def release_scratch() -> None:
    """Drop this thread's cached device buffers (they only grow)."""
    _BACKENDS.cache = {}


def voxelize_cuda(points, grid: VoxelGrid | None = None, labels=None) -> Voxels:  # pragma: no cover
    """CUDA path of `sparse_ad.voxelize.voxelize` (see there for the contract).

    points: (N, 3+C) torch CUDA tensor, grid-frame xyz then C feature columns; labels: (N,)
    integer CUDA tensor on the same device, or None. Results are torch tensors on that
    device; `n_nonfinite` / `n_outside` are 0-d tensors. One host sync per call (reading M).
    """
    import torch

    grid = grid or VoxelGrid()
    if not isinstance(points, torch.Tensor) or not points.is_cuda:
        raise SparseADError(f"voxelize_cuda expects a torch CUDA tensor, got {_describe(points)}")
    if points.ndim != 2 or points.shape[1] < 3:
        raise SparseADError(f"voxelize_cuda expects points of shape (N, 3+C), got {tuple(points.shape)}")
    points = points.detach()
    if points.dtype not in (torch.float32, torch.float64):
        points = points.float()
    tags = None
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.device != points.device:
            raise SparseADError(f"labels must be a torch tensor on {points.device} like points, "
                                f"got {_describe(labels)}")
        check_labels(labels, points.shape[0])
        tags = labels.detach().to(torch.int32).contiguous()
    with cuda.gpus[points.device.index]:
        backend = _torch_backend(points.device)
        return _voxelize_device(points, tags, grid, backend)


def _describe(x) -> str:
    dev = getattr(x, "device", None)
    return f"{type(x).__name__}" + (f" on {dev}" if dev is not None else "")
