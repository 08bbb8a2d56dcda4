"""Readers for the per-frame files of an AnoVox split: point clouds, voxel grids, csvs.

Each returns a checked array or typed dict, or raises `SparseADError` naming the file and
the fix. `.npy` never unpickles (see `sparse_ad.io.load_npy`).
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import numpy as np

from sparse_ad.errors import SparseADError
from sparse_ad.io import load_npy, read_text
from sparse_ad.tags import CITYSCAPES_COLORS, MAX_TAG

KV_SEPARATOR = " ; "


def load_points(path: Path, semantic: bool = False) -> np.ndarray:
    """(N, 4) float32 = x, y, z, intensity (LIDAR) or semantic tag (SEMANTIC-LIDAR)."""
    path = Path(path)
    if path.suffix == ".pcd":
        pts = _load_pcd(path, semantic)
    else:
        pts = load_npy(path, ncols=4, kinds="f", dtype=np.float32)
    if semantic:   # both formats: a tag field of a PCD can hold anything its writer put there
        _check_tags(pts[:, 3], path)
    return pts


def load_voxel_grid(path: Path) -> np.ndarray:
    """VOXEL_GRID rows (M, 4) uint16 = ix, iy, iz, tag (coordinates checked by the caller's grid)."""
    rows = load_npy(path, ncols=4, kinds="iu")
    if rows.size and (rows.min() < 0 or rows.max() > np.iinfo(np.uint16).max):
        raise SparseADError(f"{path}: voxel rows out of uint16 range; re-export the ground truth")
    return rows.astype(np.uint16, copy=False)


def _check_tags(tags: np.ndarray, path: Path) -> None:
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(tags) | (tags < 0) | (tags > MAX_TAG) | (tags != np.round(tags))
    if bad.any():
        raise SparseADError(f"{path}: {int(bad.sum())} semantic tags are not integers in 0..{MAX_TAG} "
                            f"(e.g. {tags[bad][0]!r}); this is not a SEMANTIC-LIDAR file")


_warned_colors: set[Path] = set()


def _load_pcd(path: Path, semantic: bool) -> np.ndarray:
    from pypcd4 import PointCloud

    try:
        pc = PointCloud.from_path(path)
        arr = pc.numpy()
    except Exception as e:  # pypcd4 raises many types for a broken file
        raise SparseADError(f"{path}: not a readable PCD file ({type(e).__name__}: {e}); "
                            "re-export it") from None
    fields = list(pc.fields)
    col = {f: i for i, f in enumerate(fields)}
    if not {"x", "y", "z"} <= set(col):
        raise SparseADError(f"{path}: PCD has fields {fields}, needs x, y, z")
    xyz = arr[:, [col["x"], col["y"], col["z"]]]
    if not semantic:
        extra = arr[:, col["intensity"]] if "intensity" in col else np.zeros(len(arr))
    elif "tag" in col or "label" in col or "ObjTag" in col:
        extra = arr[:, col.get("tag", col.get("label", col.get("ObjTag")))]
    elif "rgb" in col:
        extra = _colors_to_tags(PointCloud.decode_rgb(_packed_rgb(pc.pc_data["rgb"], path)), path)
    elif {"r", "g", "b"} <= set(col):
        extra = _colors_to_tags(arr[:, [col["r"], col["g"], col["b"]]], path)
    else:
        raise SparseADError(f"{path}: semantic PCD has fields {fields}; needs a tag/label or rgb field")
    return np.concatenate([xyz, np.asarray(extra, np.float64)[:, None]], axis=1).astype(np.float32)


def _packed_rgb(field: np.ndarray, path: Path) -> np.ndarray:
    """The PCD `rgb` field as packed uint32 0x00RRGGBB, read in its own type: PCL writes it
    as float32 bits, other tools as uint32 (`numpy()` would have cast it with the others)."""
    field = np.ascontiguousarray(field)
    if field.dtype == np.float32:
        return field.view(np.uint32)
    if field.dtype.kind in "iu" and field.dtype.itemsize == 4:
        return field.astype(np.uint32)
    raise SparseADError(f"{path}: PCD field rgb has type {field.dtype}; expected packed colours as float32 "
                        "or uint32 (re-export it)")


def _colors_to_tags(rgb: np.ndarray, path: Path) -> np.ndarray:
    """Cityscapes colours → tags; unknown colours become 0 (unlabeled) with one warning."""
    rgb = np.asarray(rgb).astype(np.int64)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    lut_keys = np.array([(r << 16) | (g << 8) | b for (r, g, b) in CITYSCAPES_COLORS], np.int64)
    lut_tags = np.array(list(CITYSCAPES_COLORS.values()), np.int64)
    order = np.argsort(lut_keys)
    pos = np.clip(np.searchsorted(lut_keys[order], packed), 0, len(order) - 1)
    found = lut_keys[order][pos] == packed
    if not found.all() and path not in _warned_colors:
        _warned_colors.add(path)
        warnings.warn(f"{path}: {int((~found).sum())} points have colours outside the Cityscapes "
                      "palette; labelled 0 (unlabeled)", stacklevel=3)
    return np.where(found, lut_tags[order][pos], 0)


def parse_value(text: str):
    """A csv value as the generator printed it: bool, number, tuple/list literal, or text.

    Uses `ast.literal_eval`, which evaluates literals only (never code).
    """
    t = text.strip()
    if t in ("True", "False"):
        return t == "True"
    try:
        return ast.literal_eval(t)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return t


def read_kv_csv(path: Path) -> dict:
    """ANOMALY / ACTION csv: one `key ; value` per line → {key: typed value}.

    The ACTION file's `lidar transformation matrix` becomes a (4, 4) float64 array.
    """
    out = {}
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        if KV_SEPARATOR not in line:
            raise SparseADError(f"{path}:{n}: expected 'key ; value', got {line[:60]!r}")
        key, value = line.split(KV_SEPARATOR, 1)
        out[key.strip()] = parse_value(value)
    matrix = out.get("lidar transformation matrix")
    if matrix is not None:
        try:
            m = np.asarray(matrix, dtype=np.float64)
        except (TypeError, ValueError):
            m = np.zeros(0)
        if m.shape != (4, 4):
            raise SparseADError(f"{path}: 'lidar transformation matrix' is not a 4x4 matrix")
        out["lidar transformation matrix"] = m
    return out
