"""`sparse-ad eval` (a checkpoint) and `sparse-ad eval-preds` (any method's files).

Both end in the same place: per frame, predicted voxels (ix, iy, iz, score) are joined to
the frame's VOXEL_GRID by linear key and pooled in a `ProtocolAccumulator`, so our model
and any other method are scored by exactly the same code.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparse_ad.config import DEFAULT_ENGINE, Config, TransformConfig, check_ranges, config_from_saved
from sparse_ad.data.anovox import FrameRef, open_split
from sparse_ad.data.files import load_voxel_grid, read_kv_csv
from sparse_ad.data.in_flight import naming_dead_workers
from sparse_ad.data.labels import GroundTruth, target_table
from sparse_ad.engine.protocol import ProtocolAccumulator, scored_voxels
from sparse_ad.errors import SparseADError
from sparse_ad.grid import VoxelGrid
from sparse_ad.io import atomic_write_text, load_npy


def prediction_file(pred_dir: Path, ref: FrameRef) -> Path:
    """Where a frame's prediction lives: P/Scenario_<id>/VOXEL_GRID_<frame>.npy."""
    return Path(pred_dir) / ref.scenario.path.name / f"VOXEL_GRID_{ref.frame}.npy"


def load_prediction(path: Path, grid: VoxelGrid) -> tuple[np.ndarray, np.ndarray]:
    """(keys (K,) int64, scores (K,)) from a (K, 4) prediction file, checked; scores stay
    float32 when the file is float32 and are float64 otherwise (never rounded into ties)."""
    pred = load_npy(path, ncols=4, kinds="fiu")
    coords = pred[:, :3]
    if len(pred) and (not np.isfinite(pred).all() or (coords != np.round(coords)).any()
                      or (coords < 0).any() or (coords >= np.asarray(grid.shape)).any()):
        raise SparseADError(f"{path}: rows must be (ix, iy, iz, score) with integer voxel indices inside the grid "
                            f"{grid.shape} and finite scores; re-export it")
    keys = grid.keys(coords.astype(np.int64))
    if len(keys) != len(np.unique(keys)):
        raise SparseADError(f"{path}: duplicate voxels; write one row per voxel")
    scores = pred[:, 3]
    return keys, scores if scores.dtype == np.float32 else scores.astype(np.float64)


def frame_size(ref: FrameRef):
    """The anomaly's `size` from the frame's ANOMALY csv, or None."""
    path = ref.scenario.anomaly_file(ref.frame)
    if not path.exists():
        return None
    try:
        return read_kv_csv(path).get("size")
    except SparseADError as e:
        warnings.warn(f"{e} (size unknown for by_size)", stacklevel=2)
        return None


def predict_manifest(pred_dir: Path, need_threshold: bool) -> dict:
    """What `predict` recorded in pred_dir/predict.json (threshold, transform, sensor, ...), or
    {} for another method's folder. Unreadable, it is an error only when its threshold is
    needed (no --threshold given); otherwise it is passed over with a warning."""
    from sparse_ad.export import MANIFEST

    path = Path(pred_dir) / MANIFEST
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
        float(manifest["threshold"])
        TransformConfig(**manifest.get("transform", {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        if need_threshold:
            raise SparseADError(f"{path}: unreadable ({type(e).__name__}: {e}); pass --threshold") from None
        warnings.warn(f"{path}: unreadable ({type(e).__name__}: {e}); scoring with --config's transform", stacklevel=2)
        return {}
    return manifest


def predicted_on_another_split(manifest: dict, data: Path) -> bool:
    """Whether `data`'s point files differ from those `predict` made the folder's files from,
    by the fingerprint its predict.json records (`export.split_fingerprint`, recomputed as
    `predict` computes it, over the sensor it read: LIDAR where an older predict.json does not
    say, the only sensor `predict` reads): a split regenerated in place keeps its frame names,
    so its ground truth would otherwise score the old clouds' predictions. False when none is
    recorded (another method's files)."""
    from sparse_ad.export import split_fingerprint

    if "split" not in manifest:
        return False
    sensor = manifest.get("sensor", "LIDAR")
    try:
        with warnings.catch_warnings():   # predict's view of the split; eval-preds warns about its own
            warnings.simplefilter("ignore")
            now = split_fingerprint(open_split(data, sensor, need_gt=False), sensor)
    except (SparseADError, OSError):      # its point files are gone: not the split predict read
        return True
    return now != manifest["split"]


def lidar_hits_anomaly(ref: FrameRef, gt: GroundTruth, cfg: Config, grid: VoxelGrid, lut: np.ndarray) -> bool | None:
    """Whether the frame's own LiDAR sweep (`data.sensor`, every sensor of that type) hits a
    ground-truth anomaly voxel: the protocol's "anomalies only" frames. It decides that for
    `eval-preds` independently of which voxels a method predicts, so every method is scored
    on the same frames. None when the split has no such point file for the frame."""
    from dataclasses import asdict

    from sparse_ad.data.anovox import load_frame
    from sparse_ad.data.labels import ANOMALY
    from sparse_ad.data.per_point import finite_rows, point_targets

    sensors = ref.scenario.sensors_of(cfg.data.sensor)
    if not sensors or not all(s.file(ref.frame).exists() for s in sensors):
        return None
    try:
        points = finite_rows(load_frame(ref, cfg.data.sensor, with_gt=False).grid_points(**asdict(cfg.transform)))
    except SparseADError as e:   # a broken point file: decided as without one, and said
        warnings.warn(f"{e} (frame decided by its prediction's voxels)", stacklevel=2)
        return None
    return bool((point_targets(points, gt.keys, gt.tags, grid, lut) == ANOMALY).any())


def evaluate_predictions(pred_dir: Path, data: Path, out: Path, cfg: Config, threshold: float | None = None,
                         progress: bool = True, histogram_bins: int = 0) -> dict:
    """Score a prediction folder against a split; writes and returns the metrics JSON.

    threshold: for recall/precision/F1; default the calibrated one `predict` recorded in the
    folder's predict.json, else 0.5 (another method's files). "Anomalies only" frames are
    decided from the split's LiDAR, read with the transform and sensor predict.json records
    (else `cfg`'s). Exact by default (memory: 4 or 8 bytes per scored voxel, as the files' scores);
    `histogram_bins` > 0 bins scores over [0, 1] instead, for flat memory on very large splits
    (then approximate). Nothing goes unscored unsaid: frames without a prediction file
    (`missing_predictions`), files that match no frame (`unmatched_prediction_files`) and
    files `predict` made from another version of the split (its predict.json's fingerprint)
    are warned about."""
    from sparse_ad.export import MANIFEST
    from sparse_ad.io import progress_bar

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise SparseADError(f"{pred_dir}: prediction folder not found; it must mirror the split as "
                            "Scenario_<id>/VOXEL_GRID_<frame>.npy")
    manifest = predict_manifest(pred_dir, need_threshold=threshold is None)
    if threshold is None:
        threshold = float(manifest.get("threshold", 0.5))
        if manifest:
            print(f"threshold {threshold:.6g}: the checkpoint's calibrated one, from its predict.json")
    if "transform" in manifest:   # the LiDAR that decides "anomalies only" is read as the model read it
        cfg = copy.deepcopy(cfg)
        cfg.transform, cfg.data.sensor = TransformConfig(**manifest["transform"]), manifest["sensor"]
    grid = cfg.grid.build()
    lut = target_table(cfg.labels.anomaly_tags, cfg.labels.ignore_tags)
    split = open_split(data, sensor_type=None, need_gt=True)
    if predicted_on_another_split(manifest, data):
        warnings.warn(f"{pred_dir / MANIFEST}: the predictions were made on another version of the split {data} "
                      f"(its {manifest.get('sensor', 'LIDAR')} files were added, removed or rewritten since), so "
                      "they may not be "
                      "these frames' scores; re-run predict into a new folder", stacklevel=2)
    acc = ProtocolAccumulator(histogram_bins=histogram_bins)
    missing = no_lidar = 0
    for ref in progress_bar(split.frames, progress, desc="eval-preds", unit="frame"):
        path = prediction_file(pred_dir, ref)
        if not path.exists():
            missing += 1
            continue
        keys, scores = load_prediction(path, grid)
        gt_file = ref.scenario.voxel_grid_file(ref.frame)
        gt = GroundTruth.from_rows(load_voxel_grid(gt_file), grid, str(gt_file))
        seen = lidar_hits_anomaly(ref, gt, cfg, grid, lut)
        no_lidar += seen is None
        acc.add_frame(*scored_voxels(keys, scores, gt, lut), size=frame_size(ref), name=ref.name,
                      anomaly_frame=seen)
    if acc.frames == 0:
        raise SparseADError(f"{pred_dir}: no prediction file matches a frame of {data}; expected names like "
                            f"{prediction_file(pred_dir, split.frames[0])}")
    if missing:
        warnings.warn(f"{missing} frame(s) of {data} have no prediction file and are not scored", stacklevel=2)
    expected = {prediction_file(pred_dir, ref) for ref in split.frames}
    unmatched = sorted(p for p in pred_dir.glob("*/*.npy") if p not in expected)
    if unmatched:
        warnings.warn(f"{len(unmatched)} prediction file(s) under {pred_dir} match no frame of {data} and are not "
                      f"scored (e.g. {unmatched[0]}); they must be named Scenario_<id>/VOXEL_GRID_<frame>.npy "
                      "after the split's frames", stacklevel=2)
    if no_lidar:
        warnings.warn(f"{no_lidar} scored frame(s) of {data} have no readable {cfg.data.sensor} file: whether they "
                      "count as anomaly frames is decided by the voxels their prediction covers", stacklevel=2)
    result = acc.result(threshold)
    result["missing_predictions"] = missing
    result["frames_without_lidar"] = no_lidar   # scored frames whose "anomalies only" membership the prediction decided
    result["unmatched_prediction_files"] = len(unmatched)   # files no frame of the split names: not scored
    _write_json(Path(out), result)
    print(format_metrics(result))
    return result


@dataclass(frozen=True)
class Scoring:
    """How `eval` and `predict` score a checkpoint; None keeps the checkpoint's own setting.

    views:      mirrored copies averaged (`model.test_views`; its threshold was calibrated with
                the checkpoint's count, so another one shifts what it detects: warned)
    engine:     `config.INFERENCE_ENGINES`; default the device's `config.DEFAULT_ENGINE`
    batch_size: frames per forward pass (`train.batch_size`, as validation scored them)
    workers:    loader processes (`data.num_workers`)
    """

    views: int | None = None
    engine: str | None = None
    batch_size: int | None = None
    workers: int | None = None

    def engine_on(self, device: torch.device) -> str:
        """The engine that scores on `device`: the one asked for, or the device's default."""
        return self.engine or DEFAULT_ENGINE[device.type]


def load_checkpoint_model(checkpoint: Path, device: torch.device, scoring: Scoring = Scoring()):
    """(inference model, resolved Config, checkpoint dict) from a checkpoint file: BN folded into
    the convs (`fuse_for_inference`), fp16 on CUDA, fp32 (exact to ~1e-6) on CPU; the
    config carries `scoring`'s choices."""
    from sparse_ad.engine.checkpoint import load
    from sparse_ad.models.inference import fuse_for_inference
    from sparse_ad.models.spunet import build_model
    from sparse_ad.models.tta import check_views

    ck = load(checkpoint)
    if not ck.get("config"):
        raise SparseADError(f"{checkpoint}: holds no config; it was not written by `sparse-ad train`")
    cfg = config_from_saved(ck["config"], str(checkpoint))
    views = scoring.views
    if views is not None and views != cfg.model.test_views:
        warnings.warn(f"scoring with {views} view(s); the stored threshold was calibrated with "
                      f"{cfg.model.test_views}, so recall/precision/F1 at it are off-calibration", stacklevel=2)
        cfg.model.test_views = views
    check_views(cfg.model.test_views, cfg.grid.shape)
    if scoring.batch_size is not None:
        cfg.train.batch_size = scoring.batch_size
    if scoring.workers is not None:
        cfg.data.num_workers = scoring.workers
    check_ranges(cfg, ("train.batch_size", "data.num_workers"))
    model = build_model(cfg.model)
    model.load_state_dict(ck["model"])
    fused = fuse_for_inference(model.to(device).eval(), half=device.type == "cuda", engine=scoring.engine)
    return fused, cfg, ck


def predict_frames(model, cfg: Config, refs: list[FrameRef], device: torch.device, progress: bool = True,
                   desc: str = "predict"):
    """Yield (ref, keys (K,) int64, coords (K, 3) int32, scores (K,) float32) per frame, in
    `refs` order, unaugmented, on the AnoVox grid (averaged over `cfg.model.test_views`
    mirrored copies). Frames that fail to load are skipped with a warning.

    Scored as validation scores them: `train.batch_size` frames per forward pass, loaded by
    `data.num_workers` processes while the model runs. A forward pass costs the host about
    the same whatever its size on a GPU (README), so batching is most of eval's throughput
    there; BN is folded, so a frame's scores do not depend on its batch mates."""
    from sparse_ad.data.dataset import FrameDataset
    from sparse_ad.engine.validate import scored_batches
    from sparse_ad.io import progress_bar

    ds = FrameDataset(refs, cfg, train=False, labels=False)   # scores need no ground truth (eval reads its own)
    with progress_bar(None, progress, total=len(ds), desc=desc, unit="frame") as bar:
        for batch, vb, scores in scored_batches(model, ds, cfg, cfg.grid.build(), device, amp=device.type == "cuda"):
            for reason in batch.skipped:
                warnings.warn(f"skipping frame: {reason}", stacklevel=2)
            bar.update(len(batch) + len(batch.skipped))
            if vb is None:
                continue
            keys, coords = vb.keys.cpu().numpy(), vb.coords.cpu().numpy()
            for b, index in enumerate(batch.indices):
                rows = slice(vb.offsets[b], vb.offsets[b + 1])
                yield refs[index], keys[rows], coords[rows], scores[rows]


@naming_dead_workers()
def evaluate_checkpoint(checkpoint: Path, out: Path, data: Path | None = None, all_frames: bool = False,
                        device: str = "auto", progress: bool = True, histogram_bins: int = 0,
                        scoring: Scoring = Scoring()) -> dict:
    """Run a checkpoint on the held-out scenarios (or every frame) and score it (exact, or
    binned with flat memory when `histogram_bins` > 0), as `scoring` says. Frames that fail
    to load are warned about one by one and counted in `skipped_frames`, so a metric over
    fewer frames than asked for says so."""
    from sparse_ad.data.dataset import train_val_frames
    from sparse_ad.engine.runtime import data_root, pick_device, resolve_data_root
    from sparse_ad.plots import plot_curves

    dev = pick_device(device)
    model, cfg, ck = load_checkpoint_model(checkpoint, dev, scoring)
    trained_on = data_root(cfg)
    if data:
        cfg.data.root = str(data)
    split = open_split(resolve_data_root(cfg), cfg.data.sensor, need_gt=True)
    refs = split.frames
    if not all_frames:
        _, refs = train_val_frames(refs, cfg)
        if data and Path(data).expanduser().resolve() != trained_on.resolve():
            warnings.warn(f"{data} is not the split {checkpoint} was trained on, yet only its held-out scenarios "
                          f"are scored ({len(refs)} of {len(split.frames)} frames, as in training); pass "
                          "--all-frames to score a test split whole", stacklevel=2)
    grid = cfg.grid.build()
    lut = target_table(cfg.labels.anomaly_tags, cfg.labels.ignore_tags)
    acc = ProtocolAccumulator(histogram_bins=histogram_bins)
    for ref, keys, _, scores in predict_frames(model, cfg, refs, dev, progress, desc="eval"):
        gt_file = ref.scenario.voxel_grid_file(ref.frame)
        try:
            gt = GroundTruth.from_rows(load_voxel_grid(gt_file), grid, str(gt_file))
        except SparseADError as e:   # counted in skipped_frames, like a sweep that failed to load
            warnings.warn(f"skipping frame: {e}", stacklevel=2)
            continue
        # with earlier sweeps the scored voxels are more than the current sweep's, which alone
        # decides "anomalies only" (as in eval-preds); with one sweep they are the same thing
        seen = lidar_hits_anomaly(ref, gt, cfg, grid, lut) if cfg.data.sweeps > 1 else None
        acc.add_frame(*scored_voxels(keys, scores, gt, lut), size=frame_size(ref), name=ref.name,
                      anomaly_frame=seen)
    threshold = float(ck.get("threshold", 0.5))
    result = acc.result(threshold)
    result.update({"checkpoint": str(checkpoint), "epoch": ck.get("epoch"),
                   "frames_scope": "all" if all_frames else "held-out scenarios", "views": cfg.model.test_views,
                   "engine": scoring.engine_on(dev),
                   "skipped_frames": len(refs) - acc.frames})   # failed to load: predict_frames yields the rest
    if hasattr(model, "captures"):   # gather_gemm_graphs: what a stream of frames cost it in captures
        result["graph_captures"] = model.captures
        result["graph_capture_s"] = round(model.capture_s, 3)
        result["graph_fallback"] = model.eager_reason   # why it ran eagerly after all, or None
    out = Path(out)
    _write_json(out / "metrics.json", result)
    plot_curves(acc, out / "curves.png")
    print(format_metrics(result))
    return result


def _write_json(path: Path, obj: dict) -> None:
    if path.suffix != ".json":
        path = path / "metrics.json"
    atomic_write_text(path, json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def format_metrics(result: dict) -> str:
    """A small table of the two protocol sections (and sizes) for the terminal."""
    cols = ("auroc", "aupr", "fpr95", "recall", "precision", "f1", "voxels", "anomaly_voxels")
    head = f"{'scope':<20}" + "".join(f"{c:>15}" for c in cols)
    lines = [head, "-" * len(head)]
    rows = [("normality_included", result["normality_included"]), ("anomalies_only", result["anomalies_only"])]
    rows += [(f"size: {k}", v) for k, v in result.get("by_size", {}).items()]
    for name, m in rows:
        cells = []
        for c in cols:
            v = m.get(c)
            cells.append(f"{'n/a':>15}" if v is None or (isinstance(v, float) and np.isnan(v))
                         else f"{v:>15.4f}" if isinstance(v, float) else f"{v:>15}")
        lines.append(f"{name:<20}" + "".join(cells))
    not_scored = {"skipped_frames": "frame(s) skipped (failed to load)",      # eval
                  "missing_predictions": "frame(s) without a prediction file",   # eval-preds
                  "unmatched_prediction_files": "prediction file(s) matching no frame"}
    lines.append(f"threshold {result['threshold']:.6g} | frames {result['frames']} "
                 f"({result['anomaly_frames']} with anomalies)"
                 + "".join(f" | {result[k]} {what}" for k, what in not_scored.items() if k in result))
    if result.get("by_size_unknown_frames"):
        lines.append(f"by size: {result['by_size_unknown_frames']} anomaly frame(s) left out, their ANOMALY csv has "
                     "no readable `size`")
    ob = result.get("objects", {})
    if ob.get("objects"):
        lines.append(f"objects (one per anomaly frame): {ob['objects']} | a voxel detected: {ob['detected']} | "
                     f"median voxel detected: {ob['median_detected']} | median voxel above 99% of normal voxels: "
                     f"{ob['median_above_99pct_of_normals']}")
        for o in ob["worst"][:3]:
            lines.append(f"  hardest: {o['frame']} ({o['size'] or 'size ?'}, {o['voxels']} voxels): "
                         f"{o['normals_at_or_above_median']:.2%} of normal voxels score >= its median voxel")
    return "\n".join(lines)
