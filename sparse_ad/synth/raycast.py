"""Ray casting against a street scene of analytic primitives (numba `@njit`, CPU).

Every primitive is a unit shape in its own scaled frame: `local = R^T (p - c) / h`, with
`c` its centre, `R` its local→scene rotation and `h` its half extents. A box is then
[-1, 1]^3, an ellipsoid the unit sphere, a cylinder the unit disc times [-1, 1] along local
z. The ray parameter `t` is unchanged by that (linear) map, so one slab / quadric test
serves every size and orientation. The ground (z = 0) is analytic: road, road lines and
terrain by lateral position (`ground_tag`).

Speed: rays are sorted into azimuth bins around the sensor origin, and a ray tests only
the primitives whose bounding circle overlaps its bin, nearest first, stopping once the
next candidate cannot be closer than the best hit so far (horizontal distance is a lower
bound of 3-D distance). Serial on purpose: on 2 cores `prange` was slower here (measured
49 vs 30 ms per 100k rays while other work ran) and took 5x longer to compile.
"""

from __future__ import annotations

import math

import numba
import numpy as np

BOX, ELLIPSOID, CYLINDER = 0, 1, 2
N_AZIMUTH_BINS = 720
_EPS = 1e-6

# ground parameters (float64 array, see `ground_params`)
G_LEFT_EDGE, G_RIGHT_EDGE, G_LANE_W, G_DASH_PERIOD, G_DASH_ON, G_DASH_PHASE, G_LINE_HALF = range(7)
TAG_ROAD, TAG_ROAD_LINE, TAG_TERRAIN = 1, 24, 10
REFL_ROAD, REFL_LINE, REFL_TERRAIN = 0.18, 0.75, 0.35


def ground_params(left_edge: float, right_edge: float, lane_w: float, dash_phase: float) -> np.ndarray:
    """Road between y = right_edge (< 0) and y = left_edge (> 0); a dashed centre line at
    y = 0, solid lines at y = +-lane_w when there is a parking strip beyond the lane."""
    return np.array([left_edge, right_edge, lane_w, 6.0, 3.0, dash_phase, 0.075], np.float64)


@numba.njit(cache=True, inline="always")
def ground_tag(x, y, g):
    if y > g[G_LEFT_EDGE] or y < g[G_RIGHT_EDGE]:
        return TAG_TERRAIN
    half = g[G_LINE_HALF]
    if abs(y) <= half and ((x + g[G_DASH_PHASE]) % g[G_DASH_PERIOD]) < g[G_DASH_ON]:
        return TAG_ROAD_LINE
    lane = g[G_LANE_W]
    if (y > 0 and g[G_LEFT_EDGE] > lane + 0.5 or y < 0 and -g[G_RIGHT_EDGE] > lane + 0.5) \
            and abs(abs(y) - lane) <= half:
        return TAG_ROAD_LINE
    return TAG_ROAD


@numba.njit(cache=True)
def intersect_local(kind, ox, oy, oz, dx, dy, dz):
    """Entering hit of a ray with the unit primitive: (t, nx, ny, nz) in local scaled
    coordinates, t = inf when it misses (hits from inside are ignored, as in a game engine)."""
    inf = np.inf
    if kind == BOX:
        tn = -inf
        tf = inf
        axis = -1
        sign = 0.0
        for a in range(3):
            o = ox if a == 0 else (oy if a == 1 else oz)
            d = dx if a == 0 else (dy if a == 1 else dz)
            if abs(d) < 1e-12:
                if o < -1.0 or o > 1.0:
                    return inf, 0.0, 0.0, 0.0
                continue
            t1 = (-1.0 - o) / d
            t2 = (1.0 - o) / d
            s = -1.0
            if t1 > t2:
                t1, t2 = t2, t1
                s = 1.0
            if t1 > tn:
                tn = t1
                axis = a
                sign = s
            if t2 < tf:
                tf = t2
            if tn > tf:
                return inf, 0.0, 0.0, 0.0
        if tn <= _EPS or axis < 0:
            return inf, 0.0, 0.0, 0.0
        if axis == 0:
            return tn, sign, 0.0, 0.0
        if axis == 1:
            return tn, 0.0, sign, 0.0
        return tn, 0.0, 0.0, sign
    if kind == ELLIPSOID:
        a = dx * dx + dy * dy + dz * dz
        b = ox * dx + oy * dy + oz * dz
        c = ox * ox + oy * oy + oz * oz - 1.0
        disc = b * b - a * c
        if disc < 0.0:
            return inf, 0.0, 0.0, 0.0
        t = (-b - math.sqrt(disc)) / a
        if t <= _EPS:
            return inf, 0.0, 0.0, 0.0
        return t, ox + t * dx, oy + t * dy, oz + t * dz
    # cylinder: unit disc in local xy, |z| <= 1
    best = inf
    nx = ny = nz = 0.0
    a = dx * dx + dy * dy
    if a > 1e-18:
        b = ox * dx + oy * dy
        c = ox * ox + oy * oy - 1.0
        disc = b * b - a * c
        if disc >= 0.0:
            t = (-b - math.sqrt(disc)) / a
            if t > _EPS:
                z = oz + t * dz
                if -1.0 <= z <= 1.0:
                    best = t
                    nx = ox + t * dx
                    ny = oy + t * dy
                    nz = 0.0
    if abs(dz) > 1e-12:
        for cap in (-1.0, 1.0):
            t = (cap - oz) / dz
            if _EPS < t < best:
                x = ox + t * dx
                y = oy + t * dy
                if x * x + y * y <= 1.0:
                    best = t
                    nx = 0.0
                    ny = 0.0
                    nz = cap
    return best, nx, ny, nz


def build_bins(ox: float, oy: float, centers: np.ndarray, bound: np.ndarray, max_range: float,
               nbins: int = N_AZIMUTH_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR lists of the primitives per azimuth bin around (ox, oy), each sorted by the
    horizontal distance of the primitive's bounding circle (nearest first).

    Returns (bin_start (nbins + 1,), items, near (P,)); bin b holds
    items[bin_start[b]:bin_start[b + 1]]."""
    bw = 2.0 * math.pi / nbins
    dx, dy = centers[:, 0] - ox, centers[:, 1] - oy
    rho = np.hypot(dx, dy)
    near = np.maximum(rho - bound, 0.0)
    inside = rho <= bound
    phi = np.arctan2(dy, dx) + math.pi
    half = np.arcsin(np.clip(bound / np.maximum(rho, 1e-12), 0.0, 1.0))
    lo = np.floor((phi - half) / bw).astype(np.int64)
    hi = np.floor((phi + half) / bw).astype(np.int64)
    full = inside | (hi - lo >= nbins)
    lo, hi = np.where(full, 0, lo), np.where(full, nbins - 1, hi)
    hi = np.where(rho - bound > max_range, lo - 1, hi)          # out of range: no bins
    counts = np.maximum(hi - lo + 1, 0)
    prim = np.repeat(np.arange(len(centers)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    bins = (np.repeat(lo, counts) + np.arange(len(prim)) - first) % nbins
    order = np.lexsort((prim, near[prim], bins))                # by bin, then distance, then index
    starts = np.zeros(nbins + 1, np.int64)
    starts[1:] = np.cumsum(np.bincount(bins, minlength=nbins))
    return starts, np.ascontiguousarray(prim[order]), near


@numba.njit(cache=True)
def cast_rays(origin, axes, dirs, max_range, to_local, origin_local, kind, tag, refl,
              bin_start, bin_items, near, ground):
    """First hit of every ray from `origin` (scene frame).

    dirs: (R, 3) unit directions in the sensor frame; axes: (3, 3) sensor → scene.
    to_local, origin_local: per primitive, diag(1/h) R^T and the origin in scaled local
    coordinates (`local_frames`). Returns t (R,) float64 (inf: nothing within max_range),
    tag (R,) int32, cosine of the incidence angle (R,) float32, reflectivity (R,) float32.
    """
    n = dirs.shape[0]
    nbins = bin_start.shape[0] - 1
    bw = 2.0 * math.pi / nbins
    out_t = np.full(n, np.inf)
    out_tag = np.zeros(n, np.int32)
    out_cos = np.zeros(n, np.float32)
    out_refl = np.zeros(n, np.float32)
    ox, oy, oz = origin[0], origin[1], origin[2]
    for r in range(n):
        sx, sy, sz = dirs[r, 0], dirs[r, 1], dirs[r, 2]
        dx = axes[0, 0] * sx + axes[0, 1] * sy + axes[0, 2] * sz
        dy = axes[1, 0] * sx + axes[1, 1] * sy + axes[1, 2] * sz
        dz = axes[2, 0] * sx + axes[2, 1] * sy + axes[2, 2] * sz
        best = max_range
        btag = -1
        bcos = 0.0
        brefl = 0.0
        if dz < -1e-12:
            t = -oz / dz
            if t <= best:
                best = t
                btag = ground_tag(ox + t * dx, oy + t * dy, ground)
                bcos = -dz
                brefl = REFL_LINE if btag == TAG_ROAD_LINE else (REFL_ROAD if btag == TAG_ROAD else REFL_TERRAIN)
        b = int(math.floor((math.atan2(dy, dx) + math.pi) / bw)) % nbins
        for j in range(bin_start[b], bin_start[b + 1]):
            i = bin_items[j]
            if near[i] >= best:
                break
            a = to_local[i]
            ldx = a[0, 0] * dx + a[0, 1] * dy + a[0, 2] * dz
            ldy = a[1, 0] * dx + a[1, 1] * dy + a[1, 2] * dz
            ldz = a[2, 0] * dx + a[2, 1] * dy + a[2, 2] * dz
            t, nlx, nly, nlz = intersect_local(kind[i], origin_local[i, 0], origin_local[i, 1],
                                               origin_local[i, 2], ldx, ldy, ldz)
            if t < best:
                # surface normal: the local gradient mapped back with A^T
                wx = a[0, 0] * nlx + a[1, 0] * nly + a[2, 0] * nlz
                wy = a[0, 1] * nlx + a[1, 1] * nly + a[2, 1] * nlz
                wz = a[0, 2] * nlx + a[1, 2] * nly + a[2, 2] * nlz
                norm = math.sqrt(wx * wx + wy * wy + wz * wz)
                best = t
                btag = tag[i]
                bcos = abs(wx * dx + wy * dy + wz * dz) / norm if norm > 0.0 else 1.0
                brefl = refl[i]
        if btag >= 0:
            out_t[r] = best
            out_tag[r] = btag
            out_cos[r] = bcos
            out_refl[r] = brefl
    return out_t, out_tag, out_cos, out_refl


def bounding_radius(kind: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Radius of a sphere around each primitive's centre that contains it."""
    box = np.linalg.norm(half, axis=1)
    ell = half.max(axis=1)
    cyl = np.hypot(half[:, :2].max(axis=1), half[:, 2])
    return np.where(kind == BOX, box, np.where(kind == ELLIPSOID, ell, cyl))


def local_frames(rot: np.ndarray, half: np.ndarray) -> np.ndarray:
    """(P, 3, 3) diag(1/h) R^T: scene vectors → scaled local vectors."""
    return np.ascontiguousarray(np.transpose(rot, (0, 2, 1)) / half[:, :, None])


def cast(origin: np.ndarray, axes: np.ndarray, dirs: np.ndarray, max_range: float, prims, centers: np.ndarray,
         ground: np.ndarray):
    """Cast unit rays (sensor frame `dirs`, sensor → scene rotation `axes`) from `origin`
    against `prims` placed at `centers` (see `cast_rays` for the outputs)."""
    origin = np.asarray(origin, np.float64)
    starts, items, near = build_bins(float(origin[0]), float(origin[1]), centers, prims.bound,
                                     float(max_range), N_AZIMUTH_BINS)
    origin_local = np.ascontiguousarray(np.einsum("pij,pj->pi", prims.to_local, origin[None, :] - centers))
    return cast_rays(origin, np.ascontiguousarray(axes, np.float64), dirs, float(max_range), prims.to_local,
                     origin_local, prims.kind, prims.tag, prims.refl, starts, items, near, ground)


@numba.njit(cache=True)
def surface_points(t, tag, dirs):
    """Noise-free hits → (M, 4) float32 x, y, z, tag in the sensor frame (semantic LiDAR,
    camera back-projection)."""
    n = t.shape[0]
    m = 0
    for i in range(n):
        if np.isfinite(t[i]):
            m += 1
    out = np.empty((m, 4), np.float32)
    j = 0
    for i in range(n):
        if np.isfinite(t[i]):
            for c in range(3):
                out[j, c] = t[i] * dirs[i, c]
            out[j, 3] = tag[i]
            j += 1
    return out


@numba.njit(cache=True)
def sweep_points(t, tag, cos, refl, dirs, noise, drop_u, max_range, dropout):
    """Hits of one sweep → (SEMANTIC-LIDAR (M, 4), LIDAR (N, 4)) float32 in the sensor frame.

    noise, drop_u: one normal / uniform draw per hit, in ray order. SEMANTIC-LIDAR is the
    noise-free hits (`surface_points`); LIDAR: range + noise, kept when 0 < range <=
    max_range and drop_u >= dropout; intensity from reflectivity, incidence and distance."""
    sem = surface_points(t, tag, dirs)
    lid = np.empty((sem.shape[0], 4), np.float32)
    j = 0
    k = 0
    for i in range(t.shape[0]):
        if not np.isfinite(t[i]):
            continue
        r = t[i] + noise[j]
        if r > 0.0 and r <= max_range and drop_u[j] >= dropout:
            for c in range(3):
                lid[k, c] = r * dirs[i, c]
            inten = refl[i] * (0.35 + 0.65 * cos[i]) * math.exp(-0.004 * r)
            lid[k, 3] = min(max(inten, 0.0), 1.0)
            k += 1
        j += 1
    return sem, lid[:k].copy()
