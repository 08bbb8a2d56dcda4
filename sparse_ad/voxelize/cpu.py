"""Voxelization on the CPU with numba `@njit`.

The algorithm is the one the CUDA kernels run, step for step, so both give the same
answer: (1) a linear key per point in float64, (2) an open-addressing hash table of keys
(one slot per occupied voxel), (3) the occupied keys sorted, which gives every slot its
row, (4) sums and the AnoVox label rule accumulated per row. Features are summed in
float64 and divided once, so the result does not depend on summation order in practice.

AnoVox label rule: a voxel holding a road-line point (24) is 24; otherwise it takes the
tag of the point nearest its minimum corner (smallest |q - res*idx|^2), ties going to the
lowest point index.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

from sparse_ad.grid import VoxelGrid
from sparse_ad.tags import ROAD_LINE
from sparse_ad.voxelize.result import Voxels

EMPTY = np.int64(-1)
HASH_MUL = np.uint64(0x9E3779B97F4A7C15)


def table_capacity(n: int) -> int:
    """Power of two at least 2n (load factor <= 0.5 keeps probe chains short)."""
    return 1 << max(4, int(2 * max(n, 1) - 1).bit_length())


@numba.njit(cache=True, inline="always")
def point_key(x, y, z, ox, oy, oz, res, ex, ey, ez, nx, ny, nz):
    """Linear key of one grid-frame point, or -1 (not finite) / -2 (outside the grid)."""
    qx = x + ox
    qy = y + oy
    qz = z + oz
    if not (np.isfinite(qx) and np.isfinite(qy) and np.isfinite(qz)):
        return np.int64(-1)
    if qx < 0.0 or qy < 0.0 or qz < 0.0 or qx >= ex or qy >= ey or qz >= ez:
        return np.int64(-2)
    ix = np.int64(np.floor(qx / res))
    iy = np.int64(np.floor(qy / res))
    iz = np.int64(np.floor(qz / res))
    if ix >= nx or iy >= ny or iz >= nz:
        return np.int64(-2)
    return ix + iy * nx + iz * nx * ny


@numba.njit(cache=True, inline="always")
def hash_slot(key, mask):
    return np.int64((np.uint64(key) * HASH_MUL) >> np.uint64(20)) & mask


@numba.njit(cache=True)
def _keys_and_slots(xyz, ox, oy, oz, res, ex, ey, ez, nx, ny, nz, table, slot_of):
    n = xyz.shape[0]
    mask = table.shape[0] - 1
    table[:] = EMPTY
    n_nonfinite = 0
    n_outside = 0
    for i in range(n):
        k = point_key(np.float64(xyz[i, 0]), np.float64(xyz[i, 1]), np.float64(xyz[i, 2]),
                      ox, oy, oz, res, ex, ey, ez, nx, ny, nz)
        if k < 0:
            slot_of[i] = -1
            if k == -1:
                n_nonfinite += 1
            else:
                n_outside += 1
            continue
        s = hash_slot(k, mask)
        while table[s] != EMPTY and table[s] != k:
            s = (s + 1) & mask
        table[s] = k
        slot_of[i] = s
    return n_nonfinite, n_outside


@numba.njit(cache=True)
def radix_sort_pairs(keys, values):
    """Stable LSD radix sort of non-negative int64 keys (11-bit digits) carrying values.

    Runs only as many passes as the largest key needs: 3 for the AnoVox grid (26-bit keys),
    which beats a comparison sort several times over.
    """
    n = keys.shape[0]
    kmax = 0
    for i in range(n):
        if keys[i] > kmax:
            kmax = keys[i]
    k_a, v_a = keys.copy(), values.copy()
    k_b, v_b = np.empty_like(keys), np.empty_like(values)
    shift = 0
    while shift == 0 or (kmax >> shift) > 0:
        hist = np.zeros(2049, np.int64)
        for i in range(n):
            hist[((k_a[i] >> shift) & 2047) + 1] += 1
        for d in range(2048):
            hist[d + 1] += hist[d]
        for i in range(n):
            d = (k_a[i] >> shift) & 2047
            j = hist[d]
            hist[d] = j + 1
            k_b[j] = k_a[i]
            v_b[j] = v_a[i]
        k_a, k_b = k_b, k_a
        v_a, v_b = v_b, v_a
        shift += 11
    return k_a, v_a


@numba.njit(cache=True)
def _rank_slots(table, row_of_slot):
    """Sorted occupied keys; fills `row_of_slot` with the row of each occupied slot's key."""
    m = 0
    for s in range(table.shape[0]):
        if table[s] != EMPTY:
            m += 1
    slots = np.empty(m, np.int64)
    occupied = np.empty(m, np.int64)
    j = 0
    for s in range(table.shape[0]):
        if table[s] != EMPTY:
            slots[j] = s
            occupied[j] = table[s]
            j += 1
    keys, slots = radix_sort_pairs(occupied, slots)
    for r in range(m):
        row_of_slot[slots[r]] = r
    return keys


@numba.njit(cache=True)
def _accumulate(xyz, feats, tags, has_tags, slot_of, row_of_slot, m,
                ox, oy, oz, res, road_line, acc):
    n = xyz.shape[0]
    c = feats.shape[1]
    point2voxel = np.full(n, -1, np.int64)
    # One row of float64 accumulators per voxel, so a point touches one cache line:
    # [count, best r2, best point index, has road line, offset sums x3, feature sums xC]
    acc[:m] = 0.0
    for r in range(m):
        acc[r, 1] = np.inf
    half = 0.5 * res
    for i in range(n):
        s = slot_of[i]
        if s < 0:
            continue
        r = row_of_slot[s]
        point2voxel[i] = r
        a = acc[r]
        a[0] += 1.0
        qx = np.float64(xyz[i, 0]) + ox
        qy = np.float64(xyz[i, 1]) + oy
        qz = np.float64(xyz[i, 2]) + oz
        rx = qx - res * np.floor(qx / res)
        ry = qy - res * np.floor(qy / res)
        rz = qz - res * np.floor(qz / res)
        a[4] += rx - half
        a[5] += ry - half
        a[6] += rz - half
        for j in range(c):
            a[7 + j] += np.float64(feats[i, j])
        if has_tags:
            r2 = rx * rx + ry * ry + rz * rz
            if r2 < a[1]:  # strict: ties keep the lower point index
                a[1] = r2
                a[2] = i
            if tags[i] == road_line:
                a[3] = 1.0
    counts = np.empty(m, np.int32)
    features = np.empty((m, c), np.float32)
    offsets = np.empty((m, 3), np.float32)
    labels = np.zeros(m if has_tags else 0, np.int32)
    for r in range(m):
        counts[r] = np.int32(acc[r, 0])
        inv = 1.0 / acc[r, 0]
        for j in range(3):
            offsets[r, j] = acc[r, 4 + j] * inv
        for j in range(c):
            features[r, j] = acc[r, 7 + j] * inv
        if has_tags:
            labels[r] = road_line if acc[r, 3] > 0.0 else tags[np.int64(acc[r, 2])]
    return point2voxel, counts, features, offsets, labels


_SCRATCH = threading.local()


def _scratch(name: str, size: int, dtype) -> np.ndarray:
    """A per-thread buffer reused across calls: fresh multi-MB arrays cost more in page
    faults than the voxelization itself (measured: ~5 ms per 120k-point frame)."""
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.shape[0] < size:
        buf = np.empty(max(size, 1 << 16), dtype)
        setattr(_SCRATCH, name, buf)
    return buf[:size]


def voxelize_cpu(points: np.ndarray, grid: VoxelGrid, labels: np.ndarray | None = None) -> Voxels:
    """numba CPU path of `sparse_ad.voxelize.voxelize` (see there for the contract)."""
    xyz = points[:, :3]
    feats = np.ascontiguousarray(points[:, 3:])
    if not xyz.flags.c_contiguous and not xyz.flags.f_contiguous:
        xyz = np.ascontiguousarray(xyz)
    has_tags = labels is not None
    tags = np.ascontiguousarray(labels, dtype=np.int32) if has_tags else np.zeros(0, np.int32)
    ox, oy, oz = grid.offset
    ex, ey, ez = grid.extent
    nx, ny, nz = grid.shape
    n = points.shape[0]
    cap = table_capacity(n)
    table, row_of_slot = _scratch("table", cap, np.int64), _scratch("row_of_slot", cap, np.int64)
    slot_of = _scratch("slot_of", n, np.int64)
    n_nonfinite, n_outside = _keys_and_slots(xyz, ox, oy, oz, grid.resolution,
                                             ex, ey, ez, nx, ny, nz, table, slot_of)
    keys = _rank_slots(table, row_of_slot)
    width = 7 + feats.shape[1]
    acc = _scratch("acc", keys.shape[0] * width, np.float64).reshape(keys.shape[0], width)
    point2voxel, counts, features, offsets, vlabels = _accumulate(
        xyz, feats, tags, has_tags, slot_of, row_of_slot, keys.shape[0],
        ox, oy, oz, grid.resolution, ROAD_LINE, acc)
    coords = grid.decode(keys).astype(np.int32)
    return Voxels(coords=coords, keys=keys, point2voxel=point2voxel, features=features,
                  counts=counts, offsets=offsets, labels=vlabels if has_tags else None,
                  n_nonfinite=int(n_nonfinite), n_outside=int(n_outside))
