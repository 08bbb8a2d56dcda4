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
@cuda.jit(cache=not SIMULATOR)
def _k_insert(xyz, feats, nfeat, has_tags, ox, oy, oz, res, ex, ey, ez, nx, ny, nz,
              shift, mask, table, slot_of, ukeys, uslot, u_of_slot, counters,
              count, acc, minr2):
    """K1, one thread per point. Block-shared counters turn the global appends and the
    drop counts into one atomic per block (a single hot counter would serialise them)."""
    blk = cuda.shared.array(3, np.int32)       # new keys, non-finite, outside (this block)
    base = cuda.shared.array(1, np.int64)      # this block's first position in ukeys
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
    if i < xyz.shape[0]:
        qx = np.float64(xyz[i, 0]) + ox
        qy = np.float64(xyz[i, 1]) + oy
        qz = np.float64(xyz[i, 2]) + oz
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
            _accumulate(i, s, qx, qy, qz, res, feats, nfeat, has_tags, count, acc, minr2)
        slot_of[i] = s
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
        uslot[u] = s
        u_of_slot[s] = u


@cuda.jit(device=True)
def _accumulate(i, s, qx, qy, qz, res, feats, nfeat, has_tags, count, acc, minr2):
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
        cuda.atomic.add(acc, (s, 3 + j), np.float64(feats[i, j]))
    if has_tags:
        cuda.atomic.min(minr2, s, _r2_bits(rx, ry, rz))


@cuda.jit(cache=not SIMULATOR)
def _k_ties(xyz, tags, ox, oy, oz, res, road_line, road_pack, slot_of, minr2, best):
    """K2, one thread per point: the AnoVox rule's second pass (see the module doc)."""
    i = cuda.grid(1)
    if i >= xyz.shape[0]:
        return
    s = slot_of[i]
    if s < 0:
        return
    tag = tags[i]
    if tag == road_line:
        cuda.atomic.min(best, s, road_pack)
        return
    qx = np.float64(xyz[i, 0]) + ox
    qy = np.float64(xyz[i, 1]) + oy
    qz = np.float64(xyz[i, 2]) + oz
    bits = _r2_bits(_remainder(qx, res), _remainder(qy, res), _remainder(qz, res))
    if bits == minr2[s]:
        cuda.atomic.min(best, s, (np.int64(i) << 32) | (np.int64(tag) & 0xFFFFFFFF))


@cuda.jit(cache=not SIMULATOR)
def _k_finalize(m, nfeat, has_tags, nx, ny, sorted_keys, perm, inv, uslot, u_of_slot, slot_of,
                table, count, acc, minr2, best, counters, keys_out, coords_out, counts_out,
                offsets_out, features_out, labels_out, point2voxel, stats):
    """K3 over max(N, M) threads: thread r < M writes voxel row r and frees its slot;
    thread i < N writes point i's row. Thread 0 moves the drop counters to `stats` and
    zeroes them for the next call."""
    i = cuda.grid(1)
    if i == 0:
        stats[0] = counters[1]
        stats[1] = counters[2]
        counters[0] = 0
        counters[1] = 0
        counters[2] = 0
    if i < m:
        _finalize_row(i, nfeat, has_tags, nx, ny, sorted_keys, perm, uslot, table, count, acc,
                      minr2, best, keys_out, coords_out, counts_out, offsets_out, features_out,
                      labels_out)
    if i < point2voxel.shape[0]:
        s = slot_of[i]
        point2voxel[i] = -1 if s < 0 else inv[u_of_slot[s]]


@cuda.jit(device=True)
def _finalize_row(r, nfeat, has_tags, nx, ny, sorted_keys, perm, uslot, table, count, acc,
                  minr2, best, keys_out, coords_out, counts_out, offsets_out, features_out,
                  labels_out):
    """Row r of every per-voxel output from the slot of the r-th smallest key, then the
    slot back to its initial state."""
    s = uslot[perm[r]]
    k = np.int64(sorted_keys[r])
    keys_out[r] = k
    coords_out[r, 0] = k % nx
    coords_out[r, 1] = (k // nx) % ny
    coords_out[r, 2] = k // (nx * ny)
    c = count[s]
    counts_out[r] = c
    inv = 1.0 / np.float64(c)
    for j in range(3):
        offsets_out[r, j] = _mul(acc[s, j], inv)
        acc[s, j] = 0.0
    for j in range(nfeat):
        features_out[r, j] = _mul(acc[s, 3 + j], inv)
        acc[s, 3 + j] = 0.0
    if has_tags:
        low = best[s] & 0xFFFFFFFF          # the tag, stored as its low 32 bits
        if low >= 0x80000000:
            low -= 0x100000000
        labels_out[r] = low
        best[s] = I64_MAX
        minr2[s] = I64_MAX
    count[s] = 0
    table[s] = EMPTY


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

    def sort(self, keys):
        """(sorted keys, permutation, inverse permutation)."""
        perm = np.argsort(keys, kind="stable")
        inv = np.empty_like(perm)
        inv[perm] = np.arange(perm.shape[0])
        return keys[perm], perm, inv


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

    def sort(self, keys):
        sorted_keys, perm = self.torch.sort(keys)
        rows = self.torch.arange(perm.shape[0], device=self.device)
        return sorted_keys, perm, self.torch.empty_like(perm).scatter_(0, perm, rows)


class _Scratch:
    """Grow-only work buffers of one backend, reused across calls.

    The slot-indexed buffers (table, count, acc, minr2, best) and the counters are left in
    their initial state by every call: `_k_finalize` resets exactly the slots it used, so a
    call needs no memset over the whole table (which would cost as much as the insertion
    itself). `dirty` marks a call that stopped between K1 and K3; the next call then
    re-initialises them.
    """

    INIT = {"table": EMPTY, "count": 0, "acc": 0.0, "minr2": I64_MAX, "best": I64_MAX,
            "counters": 0}

    def __init__(self, backend):
        self.backend = backend
        self.arrays = {}            # name -> (backend array, kernel view, numpy dtype)
        self.dirty = False

    def get(self, name, rows, dtype, width=0):
        """Kernel view of buffer `name` with at least `rows` rows (and `width` columns).
        The hit path is a few comparisons: it runs a dozen times per call."""
        dtype = np.dtype(dtype)
        have = self.arrays.get(name)
        if have is not None:
            arr, view, have_dtype = have
            if arr.shape[0] >= rows and have_dtype == dtype and (width == 0 or arr.shape[1] >= width):
                return view
            rows = max(rows, arr.shape[0])
        rows = max(1024, 1 << (int(rows) - 1).bit_length())
        shape = (rows, width) if width else (rows,)
        if name in self.INIT:
            arr = self.backend.full(shape, self.INIT[name], dtype)
        else:
            arr = self.backend.empty(shape, dtype)
        self.arrays[name] = (arr, self.backend.view(arr), dtype)
        return self.arrays[name][1]

    def array(self, name):
        return self.arrays[name][0]

    def reset(self):
        for name, value in self.INIT.items():
            if name in self.arrays:
                self.backend.fill(self.arrays[name][0], value)
        self.dirty = False


def _shape(shape) -> tuple:
    return (int(shape),) if np.ndim(shape) == 0 else tuple(int(v) for v in shape)


# --- the algorithm ---------------------------------------------------------------------------
def _voxelize_device(xyz, feats, tags, grid: VoxelGrid, backend) -> Voxels:
    """Voxelize with the CUDA kernels; arrays are the backend's (numpy or torch CUDA).

    xyz (N, 3) float, feats (N, C) float, tags (N,) int32 or None. Returns `Voxels` whose
    arrays are the backend's; n_nonfinite / n_outside are 0-d arrays (no host read).
    """
    n, c = int(xyz.shape[0]), int(feats.shape[1])
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
    kx = backend.view(xyz)
    (ox, oy, oz), (ex, ey, ez), (nx, ny, nz) = grid.offset, grid.extent, grid.shape
    res = grid.resolution
    sc.dirty = True
    backend.launch(_k_insert, n)(
        kx, backend.view(feats) if c else w["dummy_f"], c, has_tags, ox, oy, oz, res, ex, ey, ez,
        nx, ny, nz, 32 - (cap.bit_length() - 1), cap - 1, w["table"], w["slot_of"], w["ukeys"],
        w["uslot"], w["u_of_slot"], w["counters"], w["count"], w["acc"], w["minr2"])
    if has_tags:
        backend.launch(_k_ties, n)(
            kx, backend.view(tags), ox, oy, oz, res, ROAD_LINE, _road_pack(), w["slot_of"],
            w["minr2"], w["best"])
    m = backend.read_count(sc.array("counters"))          # the host sync: M sizes the outputs
    if m > 0:
        sorted_keys, perm, inv = backend.sort(sc.array(_ukeys_name(grid))[:m])
        order = [backend.view(a) for a in (sorted_keys, perm, inv)]
    else:
        order = [sc.get("dummy_i64", 1, np.int64)] * 3
    out.allocate(m)
    backend.launch(_k_finalize, max(n, m))(
        m, c, has_tags, nx, ny, *order, w["uslot"], w["u_of_slot"], w["slot_of"], w["table"],
        w["count"], w["acc"], w["minr2"], w["best"], w["counters"], *out.views())
    sc.dirty = False
    return out.result(m)


def _ukeys_name(grid: VoxelGrid) -> str:
    """Unique keys are sorted as int32 when the grid allows: half the radix-sort passes."""
    return "ukeys32" if grid.num_voxels <= np.iinfo(np.int32).max else "ukeys64"


def _work_buffers(sc: _Scratch, n: int, cap: int, c: int, grid: VoxelGrid) -> dict:
    """Kernel views of the scratch buffers for N points and a table of `cap` slots."""
    name = _ukeys_name(grid)
    return {
        "table": sc.get("table", cap, np.int64),
        "count": sc.get("count", cap, np.int32),
        "acc": sc.get("acc", cap, np.float64, width=3 + c),
        "minr2": sc.get("minr2", cap, np.int64),
        "best": sc.get("best", cap, np.int64),
        "u_of_slot": sc.get("u_of_slot", cap, np.int32),
        "slot_of": sc.get("slot_of", n, np.int32),
        "uslot": sc.get("uslot", n, np.int32),
        "ukeys": sc.get(name, n, np.int32 if name == "ukeys32" else np.int64),
        "counters": sc.get("counters", 3, np.int64),
        "dummy_f": sc.get("dummy_f", 1, np.float32, width=1),
    }


class _Outputs:
    """The result arrays of one call. They get max(M, 1) rows and are sliced to M at the
    end, so no kernel ever sees an empty array."""

    def __init__(self, backend, n: int, c: int, has_tags: bool):
        self.backend, self.n, self.c, self.has_tags = backend, n, c, has_tags
        self.point2voxel = backend.empty(max(n, 1), np.int64)     # (N,)
        # (2,) non-finite, outside: K3 writes it; with no points nothing runs, so zeros
        self.stats = backend.empty(2, np.int64) if n else backend.full(2, 0, np.int64)

    def allocate(self, m: int) -> None:
        b, rows = self.backend, max(m, 1)
        self.keys = b.empty(rows, np.int64)                          # (M,)
        self.coords = b.empty((rows, 3), np.int32)                   # (M, 3)
        self.counts = b.empty(rows, np.int32)                        # (M,)
        self.offsets = b.empty((rows, 3), np.float32)                # (M, 3)
        self.features = b.empty((rows, max(self.c, 1)), np.float32)  # (M, C)
        self.labels = b.empty(rows if self.has_tags else 1, np.int32)  # (M,)

    def views(self) -> list:
        """Kernel views in `_k_finalize`'s argument order."""
        return [self.backend.view(a) for a in (self.keys, self.coords, self.counts, self.offsets,
                                               self.features, self.labels, self.point2voxel,
                                               self.stats)]

    def result(self, m: int) -> Voxels:
        return Voxels(coords=self.coords[:m], keys=self.keys[:m], point2voxel=self.point2voxel[:self.n],
                      features=self.features[:m, :self.c], counts=self.counts[:m],
                      offsets=self.offsets[:m], labels=self.labels[:m] if self.has_tags else None,
                      n_nonfinite=self.stats[0], n_outside=self.stats[1])


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
        if labels.shape != (points.shape[0],) or labels.is_floating_point():
            raise SparseADError(f"labels must be integer of shape ({points.shape[0]},), got "
                                f"{labels.dtype} of shape {tuple(labels.shape)}")
        tags = labels.detach().to(torch.int32).contiguous()
    with cuda.gpus[points.device.index]:
        backend = _torch_backend(points.device)
        return _voxelize_device(points[:, :3], points[:, 3:], tags, grid, backend)


def _describe(x) -> str:
    dev = getattr(x, "device", None)
    return f"{type(x).__name__}" + (f" on {dev}" if dev is not None else "")
