"""`sparse-ad check-alignment`: does this release follow the grid transform we assume?

For a sample of frames, the SEMANTIC-LIDAR points are voxelized with the configured
sensor → grid transform and with plausible mistakes (location added instead of subtracted,
no location, y not negated, rotation not negated), and each result is compared with the
release's own VOXEL_GRID: the share of LiDAR voxels the ground truth has, and how often the
labels agree on the shared voxels. The right transform agrees on ~100% of shared voxels;
a transform off by a sensor height, a sign or an axis agrees far less.

It also checks what `data.sweeps > 1` relies on: an earlier frame's points, brought into the
current frame by the ACTION poses (`data/sweeps.py`), should land on voxels of the current
VOXEL_GRID that carry their own label more often than the same points moved as far off the
right place by a wrong pose: the motion applied backwards, or twice. Only points of upright
structure count (not road, sidewalk, terrain or ground, which look the same a few metres on),
and only frames whose ego moved. The points left where they were are reported too, but are no
control: they keep the sensor-relative pattern of the scan, which the current scan repeats,
so along a wall parallel to the drive they land on the voxels it hit; on sparse scans that
beat correct poses (synthetic, 8k points a sweep at 0.25 m: 31.3% registered, 33.0% left in
place, 15.3% backwards, 12.6% twice).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from sparse_ad.config import TransformConfig
from sparse_ad.data.anovox import FrameRef, load_frame, open_split
from sparse_ad.data.labels import GroundTruth, lookup_tags
from sparse_ad.data.sweeps import earlier_frames, moved, now_from_then, sensor_pose
from sparse_ad.errors import SparseADError
from sparse_ad.grid import VoxelGrid
from sparse_ad.ground_truth import semantic_voxels
from sparse_ad.tags import FLAT_TAGS

MIN_AGREEMENT = 0.99
MIN_EGO_MOTION_M = 0.5


@dataclass
class SweepCheck:
    """Earlier sweep → current VOXEL_GRID: points landing on a voxel with their own label, when
    registered by the ACTION poses, moved by them backwards or twice (the controls), or not
    moved (module docstring)."""

    frames: int = 0
    points: int = 0
    registered: int = 0
    backwards: int = 0
    twice: int = 0
    unregistered: int = 0

    @property
    def registers(self) -> bool:
        """The poses put the points where they belong more often than either wrong motion."""
        return self.registered > max(self.backwards, self.twice)

    def message(self) -> str:
        if not self.frames:
            return "earlier sweeps: no sampled frame has an earlier one with ACTION poses and ego motion; not checked"
        reg, back, twice, raw = (getattr(self, f) / max(self.points, 1)
                                 for f in ("registered", "backwards", "twice", "unregistered"))
        verdict = ("the ACTION poses register them, as data.sweeps > 1 needs" if self.registers
                   else "WARNING: the ACTION poses do not register them; do not use data.sweeps > 1")
        return (f"earlier sweeps ({self.frames} frames, {self.points} structure points): {reg:.1%} land on a "
                f"voxel with their label when registered by the poses, {back:.1%} moved backwards, {twice:.1%} "
                f"moved twice ({raw:.1%} left in place); {verdict}")


@dataclass
class CandidateResult:
    name: str
    transform: TransformConfig
    lidar_voxels: int = 0
    shared_voxels: int = 0
    agreeing_voxels: int = 0

    @property
    def found_share(self) -> float:
        return self.shared_voxels / max(self.lidar_voxels, 1)

    @property
    def agreement(self) -> float:
        return self.agreeing_voxels / max(self.shared_voxels, 1)

    def overrides(self) -> str:
        """The `key=value` overrides that select this transform, every field of it: the user's
        config may differ from the defaults in fields this candidate leaves at theirs."""
        def text(v):
            return str(v).lower() if isinstance(v, bool) else repr(v)

        return " ".join(f"transform.{f.name}={text(getattr(self.transform, f.name))}"
                        for f in dataclasses.fields(TransformConfig))


def candidates(configured: TransformConfig) -> list[tuple[str, TransformConfig]]:
    """The configured transform first, then each single mistake applied to the AnoVox default."""
    base = TransformConfig()
    options = [
        ("configured", configured),
        ("anovox default", base),
        ("location added", dataclasses.replace(base, location_sign=1.0)),
        ("no location", dataclasses.replace(base, location_sign=0.0)),
        ("y not negated", dataclasses.replace(base, flip_y=True)),
        ("rotation not negated", dataclasses.replace(base, negate_rotation=False)),
    ]
    seen, out = [], []
    for name, t in options:
        if t not in seen:
            seen.append(t)
            out.append((name, t))
    return out


def sample_frames(frames: list, k: int) -> list:
    """k frames spread evenly over the split (deterministic)."""
    if k <= 0 or k >= len(frames):
        return list(frames)
    idx = np.linspace(0, len(frames) - 1, k).round().astype(int)
    return [frames[i] for i in sorted(set(idx))]


def check_alignment(root, grid: VoxelGrid, configured: TransformConfig, frames: int = 20,
                    progress: bool = True) -> tuple[list[CandidateResult], SweepCheck]:
    """Score every candidate transform, and the sweep registration, on a sample of frames
    (see module doc)."""
    from sparse_ad.io import progress_bar

    split = open_split(root, "SEMANTIC-LIDAR", need_gt=True)
    results = [CandidateResult(n, t) for n, t in candidates(configured)]
    sweeps = SweepCheck()
    for ref in progress_bar(sample_frames(split.frames, frames), progress, desc="check-alignment",
                            unit="frame"):
        frame = load_frame(ref, "SEMANTIC-LIDAR")
        gt = GroundTruth.from_rows(frame.gt, grid, str(ref.scenario.voxel_grid_file(ref.frame)))
        for res in results:
            variant = dataclasses.asdict(res.transform)
            vox = semantic_voxels([(p, s.transform(**variant)) for s, p in frame.points], grid)
            gt_tags = lookup_tags(vox.keys, gt)
            shared = gt_tags >= 0
            res.lidar_voxels += len(vox)
            res.shared_voxels += int(shared.sum())
            res.agreeing_voxels += int((gt_tags[shared] == vox.labels[shared]).sum())
        _check_earlier_sweep(ref, frame, gt, grid, dataclasses.asdict(configured), sweeps)
    return results, sweeps


def _check_earlier_sweep(ref, frame, gt: GroundTruth, grid: VoxelGrid, variant: dict, out: SweepCheck) -> None:
    """Add one frame's earlier sweep to `out` (skipped: no earlier frame, no poses, no motion)."""
    earlier = earlier_frames(ref, 1)
    if not earlier or len(frame.points) != 1:
        return
    try:
        now, then = sensor_pose(ref.scenario, ref.frame), sensor_pose(ref.scenario, earlier[0])
        old = load_frame(FrameRef(ref.scenario, earlier[0]), "SEMANTIC-LIDAR", with_gt=False).points[0][1]
    except SparseADError:
        return
    m = now_from_then(now, then, y_negated=not variant["flip_y"])
    if np.linalg.norm(m[:3, 3]) < MIN_EGO_MOTION_M:
        return
    old = old[~np.isin(np.rint(old[:, 3]), FLAT_TAGS)]
    tags = np.rint(old[:, 3]).astype(np.int64)
    to_grid = frame.points[0][0].transform(**variant)
    for xyz, field in ((moved(old, m), "registered"), (moved(old, np.linalg.inv(m)), "backwards"),
                       (moved(old, m @ m), "twice"), (old[:, :3], "unregistered")):
        found = lookup_tags(grid.point_keys(to_grid.apply(xyz)), gt)   # -1 outside the grid or GT
        setattr(out, field, getattr(out, field) + int((found == tags).sum()))
    out.frames += 1
    out.points += len(old)


def verdict(results: list[CandidateResult]) -> tuple[bool, str]:
    """(ok, message): ok when the configured transform is best and agrees ≥ 99%."""
    best = max(results, key=lambda r: (r.agreement, r.found_share))
    configured = results[0]
    if best.transform == configured.transform and configured.agreement >= MIN_AGREEMENT:
        return True, (f"configured transform agrees on {configured.agreement:.2%} of shared voxels "
                      f"({configured.found_share:.2%} of LiDAR voxels are in VOXEL_GRID)")
    if best.transform == configured.transform:
        return False, (f"the configured transform is the best candidate but agrees on only "
                       f"{configured.agreement:.2%} of shared voxels (< {MIN_AGREEMENT:.0%}); check the "
                       "grid resolution/offset and the label sets")
    return False, (f"candidate '{best.name}' fits better ({best.agreement:.2%} vs {configured.agreement:.2%} "
                   f"label agreement); select it with: {best.overrides()}")


def format_table(results: list[CandidateResult]) -> str:
    head = f"{'candidate':<22} {'lidar voxels':>12} {'in VOXEL_GRID':>14} {'label agreement':>16}  overrides"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.name:<22} {r.lidar_voxels:>12} {r.found_share:>14.2%} {r.agreement:>16.2%}  "
                     f"{r.overrides()}")
    return "\n".join(lines)
