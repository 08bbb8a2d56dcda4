"""`sparse-ad check-alignment`: does this release follow the grid transform we assume?

For a sample of frames, the SEMANTIC-LIDAR points are voxelized with the configured
sensor → grid transform and with plausible mistakes (location added instead of subtracted,
no location, y not negated, rotation not negated), and each result is compared with the
release's own VOXEL_GRID: the share of LiDAR voxels the ground truth has, and how often the
labels agree on the shared voxels. The right transform agrees on ~100% of shared voxels;
a transform off by a sensor height, a sign or an axis agrees far less.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from sparse_ad.config import TransformConfig
from sparse_ad.data.anovox import load_frame, open_split
from sparse_ad.data.labels import GroundTruth, lookup_tags
from sparse_ad.grid import VoxelGrid
from sparse_ad.ground_truth import semantic_voxels

MIN_AGREEMENT = 0.99


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
        """The `key=value` overrides that select this transform."""
        default = TransformConfig()
        diff = [f"transform.{f.name}={getattr(self.transform, f.name)}"
                for f in dataclasses.fields(TransformConfig)
                if getattr(self.transform, f.name) != getattr(default, f.name)]
        return " ".join(diff) or "(the defaults)"


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
                    progress: bool = True) -> list[CandidateResult]:
    """Score every candidate transform on a sample of frames (see module doc)."""
    from tqdm import tqdm

    split = open_split(root, "SEMANTIC-LIDAR", need_gt=True)
    results = [CandidateResult(n, t) for n, t in candidates(configured)]
    for ref in tqdm(sample_frames(split.frames, frames), desc="check-alignment", unit="frame",
                    disable=not progress):
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
    return results


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
