"""Voxelization benchmark: the project's voxelizer against plain baselines on LiDAR-like clouds.

`sparse-ad bench-voxelize` and `tools/voxelize.py` both call `run_bench`. Every timed
method is first checked to produce the same voxel set on the same input; a timing of a
method that computes something else would mean nothing.

CPU: `voxelize` (numba) vs a numpy reference (`np.unique` over linear keys).
CUDA (when torch sees a GPU): `voxelize_cuda` (numba kernels) vs spconv's `PointToVoxel`
(if importable) vs a `torch.unique` baseline, timed with CUDA events. For the numba path it
also reports a floor, compulsory bytes / measured copy bandwidth + launches x launch cost,
so one can tell how far from the hardware limit it is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from sparse_ad.errors import SparseADError
from sparse_ad.grid import VoxelGrid
from sparse_ad.io import atomic_write_text

DEFAULT_SIZES = (120_000, 1_000_000, 4_000_000)
DEFAULT_RESOLUTIONS = (0.5, 0.1)
DEFAULT_OUT = Path("runs/bench/voxelize.json")


# --- input ------------------------------------------------------------------------------------
def lidar_cloud(n: int, seed: int = 0, channels: int = 64, upper_deg: float = 15.0,
                lower_deg: float = -25.0, ground_z: float = -1.8, noise: float = 0.1,
                sectors: int = 48) -> np.ndarray:
    """(n, 4) float32 x, y, z, intensity: a spinning 64-channel sensor at the grid-frame
    origin over a ground plane at `ground_z`, with walls 8-80 m away (one distance per
    azimuth sector). Deterministic in `seed`; every ray hits something, as in the AnoVox
    sensor setup (64 channels, +15/-25 deg, range noise 0.1 m)."""
    rng = np.random.default_rng(seed)
    n_az = -(-n // channels)
    az = (np.arange(n_az) + rng.uniform()) * (2 * np.pi / n_az)            # (A,)
    el = np.deg2rad(np.linspace(upper_deg, lower_deg, channels))           # (64,)
    a, e = np.meshgrid(az, el, indexing="ij")                              # (A, 64): a firing = all channels
    a, e = a.ravel()[:n], e.ravel()[:n]                                    # (n,)
    wall = rng.uniform(8.0, 80.0, sectors)[(a * sectors / (2 * np.pi)).astype(np.int64) % sectors]
    r_wall = wall / np.cos(e)
    with np.errstate(divide="ignore"):
        r_ground = np.where(e < 0, ground_z / np.sin(e), np.inf)
    r = np.minimum(r_wall, r_ground) + noise * rng.standard_normal(n)
    intensity = np.exp(-r / 60.0) * rng.uniform(0.5, 1.0, n)
    cols = [r * np.cos(e) * np.cos(a), r * np.cos(e) * np.sin(a), r * np.sin(e), intensity]
    return np.stack(cols, axis=1).astype(np.float32)


# --- baselines --------------------------------------------------------------------------------
def numpy_reference(points: np.ndarray, grid: VoxelGrid) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys (M,) and point2voxel (N,) by `np.unique` over linear keys."""
    idx, valid = grid.index(points)
    keys = grid.keys(idx[valid])
    uniq, inverse = np.unique(keys, return_inverse=True)
    point2voxel = np.full(points.shape[0], -1, np.int64)
    point2voxel[valid] = inverse
    return uniq, point2voxel


def torch_unique_reference(points, grid: VoxelGrid):  # pragma: no cover - GPU only
    """The same as `numpy_reference` with torch ops on the points' device (float64 keys)."""
    import torch

    q = points[:, :3].double() + torch.tensor(grid.offset, dtype=torch.float64, device=points.device)
    idx = torch.floor(q / grid.resolution)
    extent = torch.tensor(grid.extent, dtype=torch.float64, device=points.device)
    shape = torch.tensor(grid.shape, dtype=torch.float64, device=points.device)
    valid = ((q >= 0) & (q < extent) & (idx < shape)).all(dim=1)       # NaN compares False
    keys = grid.keys(idx[valid].long())
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    point2voxel = torch.full((points.shape[0],), -1, dtype=torch.int64, device=points.device)
    point2voxel[valid] = inverse
    return uniq, point2voxel


# --- timing -----------------------------------------------------------------------------------
def median_ms(device_type: str, repeats: int, fn, *args, warmup: int = 3) -> float:
    """Median ms of `fn(*args)` after `warmup` calls: CUDA events on "cuda", else wall time."""
    return interleaved_ms(device_type, {"fn": lambda: fn(*args)}, repeats, warmup)["fn"]["median"]


def interleaved_ms(device_type: str, fns: dict, rounds: int, warmup: int = 3) -> dict:
    """{name: {"median", "p10", "p90"}} ms per call of each `fns[name]()`, timed in turn in each
    of `rounds` rounds (CUDA events around each call, the device idle before it; wall time on
    CPU), with the garbage collector off while timing.

    Interleaving puts every variant under the same conditions (clocks, other tenants), so the
    whole and its parts, or two versions, compare within one run; the spread says how far a
    single median can be trusted (session 2 saw medians of 10 calls move by 50% between runs).
    """
    import gc

    if rounds < 1:
        raise SparseADError(f"timing needs at least one round, got {rounds}")
    cuda = device_type == "cuda"
    if cuda:
        import torch
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                if cuda:
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times[name].append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        if was_enabled:
            gc.enable()
    return {name: _spread(t) for name, t in times.items()}


def _spread(times: list[float]) -> dict:
    q = np.percentile(times, [10, 50, 90])
    return {"median": float(q[1]), "p10": float(q[0]), "p90": float(q[2])}


def host_ms(fn, repeats: int = 30, sync: bool = True, warmup: int = 5) -> float:  # pragma: no cover
    """Median wall ms of `fn()` on a CUDA machine: with `sync`, until the device is done (what a
    call costs); without, the host time to issue it. Their gap tells host- from device-bound."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def _row(device, method, n, res, m, ms, base_ms=None, **extra) -> dict:
    row = {"device": device, "method": method, "points": n, "resolution": res, "voxels": int(m),
           "ms": round(ms, 3), "mpts_per_s": round(n / ms / 1e3, 2)}
    if base_ms is not None:
        row["speedup"] = round(base_ms / ms, 2)
    row.update(extra)
    return row


# --- CPU --------------------------------------------------------------------------------------
def bench_cpu(sizes, resolutions, repeats: int, seed: int) -> list[dict]:
    from sparse_ad.voxelize import voxelize

    rows = []
    for n in sizes:
        points = lidar_cloud(n, seed)
        for res in resolutions:
            grid = VoxelGrid().with_resolution(res)
            vox = voxelize(points, grid)
            ref_keys, ref_p2v = numpy_reference(points, grid)
            if not (np.array_equal(vox.keys, ref_keys) and np.array_equal(vox.point2voxel, ref_p2v)):
                raise SparseADError(f"voxelize and the numpy reference disagree on {n} points at "
                                    f"{res} m; not timing a wrong result")
            base = median_ms("cpu", repeats, numpy_reference, points, grid, warmup=1)
            ours = median_ms("cpu", repeats, voxelize, points, grid, warmup=1)
            rows.append(_row("cpu", "numpy np.unique", n, res, len(ref_keys), base))
            rows.append(_row("cpu", "sparse_ad numba", n, res, len(vox), ours, base))
    return rows


# --- CUDA -------------------------------------------------------------------------------------
def bench_cuda(sizes, resolutions, repeats: int, seed: int) -> tuple[list[dict], dict]:  # pragma: no cover
    import torch

    from sparse_ad.voxelize.cuda import voxelize_cuda

    hw = _measure_device()
    rows = []
    for n in sizes:
        host = lidar_cloud(n, seed)
        points = torch.from_numpy(host).cuda()
        tags = torch.from_numpy(np.random.default_rng(seed).integers(0, 30, n).astype(np.int32)).cuda()
        for res in resolutions:
            grid = VoxelGrid().with_resolution(res)
            vox = voxelize_cuda(points, grid)
            ref_keys, ref_p2v = torch_unique_reference(points, grid)
            same = torch.equal(vox.keys, ref_keys) and torch.equal(vox.point2voxel, ref_p2v)
            if not same:
                raise SparseADError(f"voxelize_cuda and torch.unique disagree on {n} points at {res} m")
            m = len(vox)
            base = median_ms("cuda", repeats, torch_unique_reference, points, grid)
            rows.append(_row("cuda", "torch.unique", n, res, m, base))
            ours = median_ms("cuda", repeats, voxelize_cuda, points, grid)
            floor = _floor_ms(n, m, points, labels=False, hw=hw)
            rows.append(_row("cuda", "sparse_ad numba", n, res, m, ours, base, floor_ms=round(floor, 3),
                             x_floor=round(ours / floor, 1)))
            ours_l = median_ms("cuda", repeats, voxelize_cuda, points, grid, tags)
            floor_l = _floor_ms(n, m, points, labels=True, hw=hw)
            rows.append(_row("cuda", "sparse_ad numba + labels", n, res, m, ours_l, base,
                             floor_ms=round(floor_l, 3), x_floor=round(ours_l / floor_l, 1)))
            spconv_row = _bench_spconv(points, grid, ref_keys, repeats, base)
            if spconv_row is not None:
                rows.append(spconv_row)
    return rows, hw


def _bench_spconv(points, grid, ref_keys, repeats, base):  # pragma: no cover - GPU only
    """spconv's PointToVoxel (hash-table voxelizer, float32 index math) on the same input."""
    try:
        from spconv.pytorch.utils import PointToVoxel
    except Exception:  # noqa: BLE001 - spconv missing or built without CUDA: skip the row
        return None
    import torch

    lo = [-o for o in grid.offset]
    hi = [lo[i] + grid.extent[i] for i in range(3)]
    n = points.shape[0]
    gen = PointToVoxel(vsize_xyz=[grid.resolution] * 3, coors_range_xyz=lo + hi,
                       num_point_features=points.shape[1], max_num_voxels=n,
                       max_num_points_per_voxel=1, device=points.device)
    _, indices, _, _ = gen.generate_voxel_with_id(points)
    nx, ny, _ = grid.shape
    keys = indices[:, 2].long() + indices[:, 1].long() * nx + indices[:, 0].long() * nx * ny
    keys = torch.sort(keys).values
    # spconv indexes in float32, so points within float32 rounding of a voxel face can
    # land in the neighbouring voxel: report how many voxels differ instead of failing.
    differ = int(torch.isin(keys, ref_keys, invert=True).sum()) + int(
        torch.isin(ref_keys, keys, invert=True).sum())
    ms = median_ms("cuda", repeats, gen.generate_voxel_with_id, points)
    return _row("cuda", "spconv PointToVoxel", n, grid.resolution, len(keys), ms, base,
                voxels_differing_from_reference=differ)


def _measure_device() -> dict:  # pragma: no cover - GPU only
    """Achievable copy bandwidth and the host cost of one numba / one torch launch."""
    import torch
    from numba import cuda

    buf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    out = torch.empty_like(buf)
    ms = median_ms("cuda", 10, out.copy_, buf)
    bandwidth = 2 * buf.numel() / (ms / 1e3)                     # read + write, bytes/s

    @cuda.jit
    def empty_kernel(x):
        pass

    dummy = cuda.as_cuda_array(torch.zeros(1, device="cuda"), sync=False)
    stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    launch = _per_call_us(lambda: empty_kernel[1, 32, stream](dummy))
    small = torch.zeros(1, device="cuda")
    torch_op = _per_call_us(lambda: small.add_(1))
    return {"copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "numba_launch_us": round(launch, 1),
            "torch_op_us": round(torch_op, 1)}


def _per_call_us(fn, calls: int = 300) -> float:  # pragma: no cover - GPU only
    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


# numba launches and torch ops of one `voxelize_cuda` call (sort ~3, arange, scatter, fills)
NUMBA_LAUNCHES = {False: 2, True: 3}
TORCH_OPS = 5


def _floor_ms(n, m, points, labels: bool, hw: dict) -> float:  # pragma: no cover - GPU only
    """Compulsory traffic (read the points (and tags) once, write every output once) at the
    measured copy bandwidth, plus the host cost of each launch: no implementation of this
    contract can beat it on this machine."""
    c = points.shape[1] - 3
    read = n * points.shape[1] * points.element_size() + (4 * n if labels else 0)
    write = 8 * n + m * (8 + 12 + 4 + 12 + 4 * c + (4 if labels else 0))
    transfer_ms = (read + write) / (hw["copy_bandwidth_gb_s"] * 1e9) * 1e3
    launch_ms = (NUMBA_LAUNCHES[labels] * hw["numba_launch_us"] + TORCH_OPS * hw["torch_op_us"]) / 1e3
    return transfer_ms + launch_ms


# --- driver -----------------------------------------------------------------------------------
def machine_info() -> dict:
    import numba

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        import spconv

        info["spconv"] = spconv.__version__
    except Exception:  # noqa: BLE001 - optional, and its import can fail in many ways
        pass
    return info


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def bench_voxelize(sizes=DEFAULT_SIZES, resolutions=DEFAULT_RESOLUTIONS, device: str = "auto",
                   repeats: int | None = None, out_json: str | Path | None = None,
                   seed: int = 0) -> dict:
    """Run the benchmark; returns (and writes to `out_json`, atomically) the report.

    device: "cpu", "cuda" or "auto" (the CPU always, plus CUDA when torch sees a GPU).
    repeats: timed runs per method after one warm-up (default 3 on CPU, 20 on CUDA); the
    median is reported.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise SparseADError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not _cuda_available():
        raise SparseADError("device=cuda asked for, but torch sees no CUDA device; use --device cpu")
    report = {"machine": machine_info(), "sizes": list(sizes), "resolutions": list(resolutions),
              "seed": seed, "results": []}
    if device in ("auto", "cpu"):
        report["results"] += bench_cpu(sizes, resolutions, repeats or 3, seed)
    if device == "cuda" or (device == "auto" and _cuda_available()):
        rows, hw = bench_cuda(sizes, resolutions, repeats or 20, seed)
        report["results"] += rows
        report["device_limits"] = hw
    if out_json is not None:
        atomic_write_text(Path(out_json), json.dumps(report, indent=2) + "\n")
    return report


def format_table(rows: list[dict]) -> str:
    cols = ["device", "method", "points", "resolution", "voxels", "ms", "mpts_per_s", "speedup",
            "floor_ms", "x_floor"]
    cols = [c for c in cols if any(c in r for r in rows)]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) if v[:1].isdigit() else v.ljust(w)
                        for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    """Comma-separated whole numbers >= 1 (point counts: 0.5 would round to an empty cloud)."""
    return [positive_int(v) for v in text.split(",") if v.strip()] or [positive_int("")]


def positive_int(text: str) -> int:
    """A whole number >= 1 (repeats, rounds, points, batch sizes)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1 and value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1, got {text!r}")
    return int(value)


def _float_list(text: str) -> list[float]:
    """Comma-separated positive numbers (point counts, resolutions)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(np.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return values


def add_bench_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `sparse-ad bench-voxelize` and `tools/voxelize.py`."""
    parser.add_argument("--sizes", type=_int_list, default=list(DEFAULT_SIZES),
                        help="points per cloud, comma-separated (default %(default)s)")
    parser.add_argument("--resolutions", type=_float_list, default=list(DEFAULT_RESOLUTIONS),
                        help="voxel sizes in metres, comma-separated (default %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed runs per method after a warm-up (default 3 CPU, 20 CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report (default %(default)s)")
    return parser


def run_bench(args: argparse.Namespace) -> int:
    """CLI body: run, print the table, write the JSON."""
    report = bench_voxelize(args.sizes, args.resolutions, args.device, args.repeats, args.out, args.seed)
    m = report["machine"]
    print(f"# {m['processor']}, {m['cpu_count']} CPUs, numba {m['numba']}, torch {m.get('torch', '-')}"
          + (f", {m['gpu']}" if "gpu" in m else ""))
    if "device_limits" in report:
        print(f"# device: {report['device_limits']}")
    print(format_table(report["results"]))
    print(f"# written {args.out}")
    return 0
