"""Frames → labelled grid-frame points, the unit the trainer and evaluator consume.

Labels are exact and augmentation-proof: each LiDAR point first gets the target of the
ground-truth voxel it falls in on the AnoVox grid (unaugmented, float64), and carries that
target through augmentation; the step then voxelizes the labelled points (on the GPU when
training on CUDA) and a voxel's target is derived from its points (`batch.py`). Without
augmentation this is identical to joining the input voxels to VOXEL_GRID by key.

Augmentation is seeded by (seed, epoch, frame index), so it does not depend on worker
count, order, or a resumed run's RNG state.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np

from sparse_ad.config import AugmentConfig, Config
from sparse_ad.data.anovox import FrameRef, load_frame
from sparse_ad.data.in_flight import InFlight
from sparse_ad.data.labels import ANOMALY, GroundTruth, target_table
from sparse_ad.data.per_point import add_xyz, finite_rows, point_targets, rotate_flip_scale
from sparse_ad.data.sweeps import check_mono, check_sweeps, stacked_grid_points
from sparse_ad.errors import ConfigError, SparseADError


@dataclass
class Sample:
    """One frame ready for voxelization (numpy, CPU)."""

    index: int                 # position in the dataset (stable across epochs)
    name: str                  # "<scenario id>/<frame>"
    points: np.ndarray         # (N, 4) float64: grid-frame x, y, z, intensity (+ sweep lag: (N, 5))
    point_targets: np.ndarray  # (N,) int8: 1 anomaly, 0 normal, -1 ignore / not in GT
    lidar_sees_anomaly: bool   # a point (of any sweep) lies in an anomaly voxel of the frame's GT: the
    #                            frame label training uses (what the input can show)
    current_sees_anomaly: bool | None = None   # ... a point of the current sweep: "anomalies only"
    #                            membership (None: the same as lidar_sees_anomaly, one sweep)


def augment(points: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Rotate about z, flip y, scale and jitter the xyz of grid-frame points (a copy).
    The draws, in this order: angle, flip (if enabled), scale, jitter (N, 3)."""
    theta = np.deg2rad(rng.uniform(-cfg.rotate_z_deg, cfg.rotate_z_deg))
    flip = bool(cfg.flip_y and rng.random() < 0.5)
    out = rotate_flip_scale(points, np.cos(theta), np.sin(theta), flip, rng.uniform(*cfg.scale))
    if cfg.jitter_m > 0:
        add_xyz(out, rng.normal(0.0, cfg.jitter_m, size=(len(out), 3)))
    return out


class FrameDataset:
    """Map-style dataset over frame refs (works with torch's DataLoader and samplers).

    A broken frame (truncated file, wrong shape, ...) raises `SparseADError`; the loader's
    collate drops it and the trainer counts it (see `batch.collate`).
    """

    def __init__(self, frames: list[FrameRef], cfg: Config, train: bool, labels: bool = True):
        """`labels`: read each frame's VOXEL_GRID (where there is one) for the targets; False
        for scoring alone (`predict`, `eval`), so a broken ground-truth file cannot cost a
        prediction: every target is then "ignore"."""
        from sparse_ad.models.spunet import check_input_channels

        if cfg.data.sensor != "LIDAR":   # SEMANTIC-LIDAR's 4th column would reach the model as intensity
            raise ConfigError(f"data.sensor={cfg.data.sensor}: the model reads LIDAR sweeps (x, y, z, "
                              "intensity); a SEMANTIC-LIDAR sweep's 4th column is the semantic tag, i.e. the "
                              "label; set data.sensor=LIDAR")
        check_sweeps(cfg.data.sweeps)
        check_input_channels(cfg.model.in_channels, cfg.data.sweeps)
        if cfg.data.sweeps > 1:   # a stereo split: a setting that cannot work, not broken frames
            for scenario in {id(r.scenario): r.scenario for r in frames}.values():
                check_mono(scenario, cfg.data.sensor)
        self.frames = frames
        self.cfg = cfg
        self.grid = cfg.grid.build()
        self.lut = target_table(cfg.labels.anomaly_tags, cfg.labels.ignore_tags)
        self.train = train
        self.labels = labels
        self.epoch = 0
        self.in_flight = InFlight(frames)

    def __len__(self) -> int:
        return len(self.frames)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Sample | SparseADError:
        ref = self.frames[index]
        try:
            with self.in_flight.loading(index):
                return self._load(index, ref)
        except SparseADError as e:  # returned, not raised, so one bad file does not kill a worker
            return e
        except MemoryError:
            raise SparseADError(f"frame {ref.name}: out of memory while loading it; lower data.num_workers "
                                "or train.batch_size") from None
        except Exception as e:  # a bug or an unforeseen file problem: name the frame, keep the cause
            raise RuntimeError(f"while loading frame {ref.name} ({ref.scenario.path}): "
                               f"{type(e).__name__}: {e}") from e

    def _load(self, index: int, ref: FrameRef) -> Sample:
        frame = load_frame(ref, self.cfg.data.sensor,
                           with_gt=self.labels and ref.scenario.voxel_grid_file(ref.frame).exists())
        variant = asdict(self.cfg.transform)
        if self.cfg.data.sweeps > 1:
            points = stacked_grid_points(ref, self.cfg.data.sensor, self.cfg.data.sweeps, variant, frame)
        else:
            points = frame.grid_points(**variant)
        if frame.gt is not None:
            gt = GroundTruth.from_rows(frame.gt, self.grid, str(ref.scenario.voxel_grid_file(ref.frame)))
        else:  # scoring alone, or a split without ground truth: every target is "ignore"
            gt = GroundTruth(np.zeros(0, np.int64), np.zeros(0, np.int64))
        points = finite_rows(points)
        targets = point_targets(points, gt.keys, gt.tags, self.grid, self.lut)
        if self.train and self.cfg.augment.enabled:
            rng = np.random.default_rng([self.cfg.train.seed, self.epoch, index])
            points = augment(points, self.cfg.augment, rng)
        seen = bool((targets == ANOMALY).any())
        current = None if self.cfg.data.sweeps == 1 else bool((targets[points[:, 4] == 0] == ANOMALY).any())
        return Sample(index, ref.name, points, targets, seen, current)   # lag 0 is this sweep


def train_val_frames(frames: list[FrameRef], cfg: Config) -> tuple[list[FrameRef], list[FrameRef]]:
    """A run's training and validation frames: the first `data.max_frames` (if set) of the
    split, divided by scenario. Training, eval and the demo all take them from here, so
    "held-out" names the same frames everywhere."""
    if cfg.data.max_frames:
        frames = frames[:cfg.data.max_frames]
    return split_scenarios(frames, cfg.data.val_fraction, cfg.data.split_seed,
                           (cfg.labels.anomaly_tags, cfg.labels.ignore_tags))


def split_scenarios(frames: list[FrameRef], val_fraction: float, seed: int,
                    label_sets: tuple = ()) -> tuple[list[FrameRef], list[FrameRef]]:
    """Scenario-level train/val split: no frame of a validation scenario is trained on.

    Anomalous and normal-only scenarios are split separately (stratified), so validation
    has anomalies whenever the split has at least two anomalous scenarios.
    label_sets: (anomaly_tags, ignore_tags); defaults to the AnoVox sets.
    """
    by_scenario: dict[str, list[FrameRef]] = {}
    for ref in frames:
        by_scenario.setdefault(ref.scenario.id, []).append(ref)
    ids = sorted(by_scenario)
    if len(ids) < 2:
        warnings.warn("only one scenario: validation reuses it (metrics are not held-out)", stacklevel=2)
        return frames, frames
    rng = np.random.default_rng(seed)
    val_ids = set()
    lut = target_table(*label_sets) if label_sets else target_table()
    anomalous = [i for i in ids if _scenario_has_anomaly(by_scenario[i], lut)]
    for group in (anomalous, [i for i in ids if i not in set(anomalous)]):
        group = list(group)
        rng.shuffle(group)
        k = int(round(len(group) * val_fraction))
        if len(group) >= 2:
            k = min(max(k, 1), len(group) - 1)
        val_ids.update(group[:k])
    if not val_ids:
        val_ids = {ids[-1]}
    train = [r for i in ids if i not in val_ids for r in by_scenario[i]]
    val = [r for i in ids if i in val_ids for r in by_scenario[i]]
    if not train:
        raise SparseADError("the validation split took every scenario; lower data.val_fraction")
    return train, val


def _scenario_has_anomaly(refs: list[FrameRef], lut: np.ndarray, probes: int = 5) -> bool:
    """Whether a few evenly spaced frames' VOXEL_GRIDs hold anomaly tags. Used only to
    stratify the split, so a cheap sample is enough; unreadable files count as normal."""
    from sparse_ad.data.files import load_voxel_grid

    picks = np.unique(np.linspace(0, len(refs) - 1, min(probes, len(refs))).round().astype(int))
    for i in picks:
        ref = refs[i]
        try:
            rows = load_voxel_grid(ref.scenario.voxel_grid_file(ref.frame))
        except SparseADError:
            continue
        if len(rows) and (lut[rows[:, 3]] == ANOMALY).any():
            return True
    return False
