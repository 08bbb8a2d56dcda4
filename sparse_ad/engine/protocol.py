"""The AnoVox evaluation protocol, shared by validation, `eval` and `eval-preds`.

Only voxels present in BOTH the prediction and the ground truth are scored (joined by
linear key), ignore tags are dropped, and scores are pooled over all frames. Results are
reported over all frames ("normality included"), over frames whose ground truth holds
anomaly voxels that the LiDAR hits ("anomalies only"), and per anomaly size.

Beside the benchmark's voxel metrics, `objects` looks at each frame's anomaly as one object
(AnoVox places one per scenario): is any of its voxels detected, and how many normal voxels
score above its median voxel. Pooled voxel AUPR hides which objects are missed (a few large
ones dominate it); this names them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sparse_ad.data.labels import ANOMALY, IGNORE, GroundTruth, lookup_tags, targets_from_tags
from sparse_ad.errors import SparseADError
from sparse_ad.metrics import ScoreAccumulator

SIZE_BUCKETS = (("small", 0.0, 1.0), ("medium", 1.0, 2.0), ("large", 2.0, math.inf))
"""Anomaly size buckets by the largest extent (m) of the ANOMALY csv `size`."""
NAMED_SIZES = {"tiny": "small", "small": "small", "medium": "medium", "big": "large", "large": "large",
               "huge": "large"}
"""CARLA's prop size attribute (tiny, small, medium, big, huge) and our bucket names, as buckets."""


def size_bucket(size) -> str | None:
    """Bucket name for an ANOMALY csv `size` value: an (x, y, z) extent (a tuple, or numbers
    printed by numpy as `[0.5 0.5 0.7]`), a number (m), or a CARLA size name; None if none."""
    if isinstance(size, str):
        text = size.strip().lower()
        if text in NAMED_SIZES:
            return NAMED_SIZES[text]
        size = text.strip("[]()").replace(",", " ").split()
    try:
        extent = max(float(v) for v in size) if isinstance(size, (list, tuple)) else float(size)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(extent):
        return None
    for name, lo, hi in SIZE_BUCKETS:
        if lo <= extent < hi:
            return name
    return None


def scored_voxels(pred_keys: np.ndarray, pred_scores: np.ndarray, gt: GroundTruth, lut: np.ndarray):
    """(scores, labels) of predicted voxels that the GT has and does not ignore."""
    targets = targets_from_tags(lookup_tags(pred_keys, gt), lut)
    keep = targets != IGNORE
    return pred_scores[keep], (targets[keep] == ANOMALY)


@dataclass
class ProtocolAccumulator:
    """Streams frames in; `result(threshold)` gives the benchmark's JSON sections."""

    histogram_bins: int = 0
    frames: int = 0
    anomaly_frames: int = 0
    unknown_size_frames: int = 0   # anomaly frames left out of by_size (no or unreadable `size`)
    all: ScoreAccumulator = field(init=False)
    anomalies_only: ScoreAccumulator = field(init=False)
    by_size: dict = field(init=False)
    objects: list = field(init=False)   # per anomaly frame: name, size, voxels, median, max

    def __post_init__(self):
        self.all = self._new()
        self.anomalies_only = self._new()
        self.by_size = {}
        self.objects = []

    def _new(self) -> ScoreAccumulator:
        """Exact, or binned over [0, 1] (scores here are probabilities) for flat memory."""
        return ScoreAccumulator(histogram_bins=self.histogram_bins, score_range=(0.0, 1.0 + 1e-6))

    def add_frame(self, scores: np.ndarray, labels: np.ndarray, size=None, name: str | None = None,
                  anomaly_frame: bool | None = None) -> None:
        """scores: (K,) float of scored voxels (kept in their dtype: rounding float64 scores to
        float32 would merge distinct scores into ties); labels: (K,) bool anomaly; size: the
        ANOMALY csv `size`; name: the frame, for the per-object list; anomaly_frame: whether
        the frame belongs to "anomalies only" (the LiDAR hits an anomaly voxel), default:
        whether a scored voxel is an anomaly, which is the same when the scored voxels are the
        LiDAR's own."""
        scores = np.asarray(scores)
        labels = np.asarray(labels, bool)
        if self.histogram_bins and len(scores) and not (0.0 <= scores.min() and scores.max() <= 1.0):
            raise SparseADError(f"{name or 'a frame'}: scores in [{scores.min():g}, {scores.max():g}], but "
                                "histogram mode bins probabilities in [0, 1]; pass probabilities, or leave out "
                                "--histogram-bins to score exactly")
        self.frames += 1
        self.all.update(scores, labels)
        if labels.any() if anomaly_frame is None else anomaly_frame:
            self.anomaly_frames += 1
            self.anomalies_only.update(scores, labels)
            bucket = size_bucket(size) if size is not None else None
            self.unknown_size_frames += bucket is None
            if bucket:
                if bucket not in self.by_size:
                    self.by_size[bucket] = self._new()
                self.by_size[bucket].update(scores, labels)
            hit = scores[labels]   # empty when a method predicts none of the object's voxels: missed
            self.objects.append({"frame": name or f"#{self.frames - 1}", "size": bucket, "voxels": int(len(hit)),
                                 "median_score": float(np.median(hit)) if len(hit) else None,
                                 "max_score": float(hit.max()) if len(hit) else None})

    def result(self, threshold: float) -> dict:
        out = {"frames": self.frames, "anomaly_frames": self.anomaly_frames, "threshold": threshold,
               "normality_included": self.all.compute(threshold).to_dict(),
               "anomalies_only": self.anomalies_only.compute(threshold).to_dict(),
               "by_size": {name: self.by_size[name].compute(threshold).to_dict()
                           for name, _, _ in SIZE_BUCKETS if name in self.by_size},
               "by_size_unknown_frames": self.unknown_size_frames,
               "objects": object_summary(self.objects, self.anomalies_only, threshold)}
        return out


def object_summary(objects: list[dict], pool: ScoreAccumulator, threshold: float, worst: int = 10) -> dict:
    """Object-level view of the anomalies-only pool: how many objects have a voxel at or above
    `threshold` (`detected`) or their median voxel there (`median_detected`), how many have
    their median voxel above 99% of the pool's normal voxels, and the `worst` objects by the
    fraction of normal voxels scoring at least their median (each with that fraction)."""
    if not objects:
        return {"objects": 0}
    median = np.array([-np.inf if o["median_score"] is None else o["median_score"] for o in objects])
    peak = np.array([-np.inf if o["max_score"] is None else o["max_score"] for o in objects])
    above = np.where(np.isfinite(median), pool.normal_fraction_ge(median), 1.0)   # a missed object: all above
    order = np.argsort(-above, kind="stable")[:worst]
    return {"objects": len(objects), "detected": int((peak >= threshold).sum()),
            "median_detected": int((median >= threshold).sum()),
            "median_above_99pct_of_normals": int((above <= 0.01).sum()),
            "worst": [{**objects[i], "normals_at_or_above_median": float(above[i])} for i in order]}
