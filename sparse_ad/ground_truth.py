"""AnoVox ground-truth voxel grids from semantic points (`sparse-ad voxelize-gt`).

`voxel_grid_rows` is what the AnoVox generator computes for one sensor set, row for row:
sensor frame → grid frame (`SensorTransform`), then the voxelizer's AnoVox label rule, rows
in ascending linear-key order as uint16 (ix, iy, iz, tag). `regenerate_split` does it for
every frame of a split, e.g. at another resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparse_ad.errors import SparseADError
from sparse_ad.grid import SensorTransform, VoxelGrid
from sparse_ad.io import atomic_save_npy, claim_folder
from sparse_ad.voxelize import voxelize


def voxel_grid_rows(points: np.ndarray, transform: SensorTransform, grid: VoxelGrid | None = None) -> np.ndarray:
    """Semantic points (N, 4) = x, y, z, tag in a sensor frame → VOXEL_GRID rows (M, 4) uint16."""
    return merged_rows([(points, transform)], grid or VoxelGrid())


def semantic_voxels(parts: list[tuple[np.ndarray, SensorTransform]], grid: VoxelGrid):
    """Semantic points of one frame from one or more sensor sets, each (N, 4) = x, y, z, tag
    with its transform: all go into the grid frame, then one voxelization with the AnoVox
    label rule (the generator merges its sources the same way)."""
    xyz = np.concatenate([t.apply(p) for p, t in parts]) if parts else np.zeros((0, 3))
    tags = np.concatenate([np.rint(p[:, 3]).astype(np.int64) for p, _ in parts]) if parts else np.zeros(0, np.int64)
    return voxelize(xyz, grid, labels=tags)


def merged_rows(parts: list[tuple[np.ndarray, SensorTransform]], grid: VoxelGrid) -> np.ndarray:
    """`semantic_voxels` as VOXEL_GRID rows (M, 4) uint16 in ascending linear-key order."""
    if max(grid.shape) > np.iinfo(np.uint16).max + 1:
        raise SparseADError(f"grid shape {grid.shape} does not fit uint16 coordinates; use a coarser resolution")
    vox = semantic_voxels(parts, grid)
    rows = np.empty((len(vox), 4), np.uint16)
    rows[:, :3] = vox.coords
    rows[:, 3] = vox.labels
    return rows


def regenerate_split(split_dir: Path, out_dir: Path, grid: VoxelGrid, progress: bool = True) -> int:
    """Rewrite `Scenario_*/VOXEL_GRID/VOXEL_GRID_<frame>.npy` under `out_dir` from every
    SEMANTIC-LIDAR sensor of each frame; the scenario's other folders and files are linked
    beside them, so `out_dir` is a split that trains and evaluates on the new grid. Returns the
    number of frames written; frames already written are kept, so an interrupted run resumes —
    on the same grid only, which `out_dir/voxelize_gt.json` records."""
    from sparse_ad.data.anovox import load_frame, open_split
    from sparse_ad.io import progress_bar

    split = open_split(split_dir, "SEMANTIC-LIDAR", need_gt=False)
    claim_folder(Path(out_dir), "voxelize_gt.json", {"resolution": grid.resolution, "shape": list(grid.shape),
                                                     "offset": list(grid.offset)}, "ground truth")
    for sc in split.scenarios:
        _link_inputs(sc.path, Path(out_dir) / sc.path.name)
    written = 0
    for ref in progress_bar(split.frames, progress, desc="voxelize-gt", unit="frame"):
        target = Path(out_dir) / ref.scenario.path.name / "VOXEL_GRID" / f"VOXEL_GRID_{ref.frame}.npy"
        if target.exists():
            continue
        frame = load_frame(ref, "SEMANTIC-LIDAR", with_gt=False)
        rows = merged_rows([(p, s.transform()) for s, p in frame.points], grid)
        atomic_save_npy(target, rows)
        written += 1
    return written


def _link_inputs(scenario: Path, out: Path) -> None:
    """Symbolic links in `out` to everything of `scenario` but its VOXEL_GRID (no copies)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for child in scenario.iterdir():
            link = out / child.name
            if child.name != "VOXEL_GRID" and not (link.exists() or link.is_symlink()):
                link.symlink_to(child.resolve(), target_is_directory=child.is_dir())
    except OSError as e:
        raise SparseADError(f"{out}: cannot link the scenario's sensor folders there ({e.strerror or e}); pick an "
                            "--out on a filesystem with symbolic links, or copy them yourself") from None
