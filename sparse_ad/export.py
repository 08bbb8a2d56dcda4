"""`sparse-ad predict`: AnoVox benchmark files, one (K, 4) float32 .npy per frame.

Layout mirrors the split: `OUT/Scenario_<id>/VOXEL_GRID_<frame>.npy` with rows
(ix, iy, iz, score) on the AnoVox grid, so AnoVox's tools and `sparse-ad eval-preds` can
score them. Files are written atomically and existing ones are kept, so an interrupted
run resumes where it stopped — with the same checkpoint, view count, engine, precision and
split files only, which `OUT/predict.json` records (a rerun with others is refused rather
than mixing two models' files in one folder), beside what `eval-preds` then scores with by
default: the checkpoint's calibrated threshold, transform and sensor. `--bev` draws a PNG beside
each .npy; a kept .npy without its PNG (a run stopped between the two, or one without `--bev`)
gets it drawn from the saved file, without running the model again.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from sparse_ad.data.in_flight import naming_dead_workers
from sparse_ad.io import atomic_save_npy, claim_folder, file_sha256, load_npy

MANIFEST = "predict.json"


def prediction_rows(coords: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(K, 3) int voxel coords + (K,) scores → (K, 4) float32 rows."""
    rows = np.empty((len(coords), 4), np.float32)
    rows[:, :3] = coords
    rows[:, 3] = scores
    return rows


def split_fingerprint(split, sensor: str) -> str:
    """A hash of the split's point files (path inside the split, size, modification time): a
    split regenerated in place keeps its scenario and frame ids, so the file names alone
    would let a resumed `predict` keep predictions of the old point clouds."""
    import hashlib

    h = hashlib.sha256()
    for ref in split.frames:
        for sensor_ in ref.scenario.sensors_of(sensor):
            path = sensor_.file(ref.frame)
            st = path.stat()
            h.update(f"{path.relative_to(split.root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def draw_bev(ref, coords: np.ndarray, scores: np.ndarray, cfg, path: Path, threshold: float) -> None:
    """The bird's-eye PNG beside prediction file `path` (written atomically by `plots`)."""
    from sparse_ad.plots import plot_bev

    gt_file = ref.scenario.voxel_grid_file(ref.frame)
    plot_bev(coords, scores, gt_file if gt_file.exists() else None, cfg, path.with_suffix(".png"),
             threshold=threshold, title=ref.name)


@naming_dead_workers()
def predict_split(checkpoint: Path, data: Path, out: Path, bev: bool = False, device: str = "auto",
                  progress: bool = True, scoring=None) -> int:
    """Write prediction files for every frame of `data`, scored as `scoring`
    (`evaluate.Scoring`) says; returns the number written."""
    from sparse_ad.data.anovox import open_split
    from sparse_ad.engine.evaluate import Scoring, load_checkpoint_model, predict_frames, prediction_file
    from sparse_ad.engine.runtime import pick_device

    dev = pick_device(device)
    scoring = scoring or Scoring()
    model, cfg, ck = load_checkpoint_model(checkpoint, dev, scoring)
    split = open_split(data, cfg.data.sensor, need_gt=False)
    threshold = float(ck.get("threshold", 0.5))   # calibrated in validation: the operating point
    out = Path(out)
    claim_folder(out, MANIFEST, {"checkpoint_sha256": file_sha256(checkpoint), "views": cfg.model.test_views,
                                 "engine": scoring.engine_on(dev),
                                 "precision": "fp16" if dev.type == "cuda" else "fp32",
                                 "split": split_fingerprint(split, cfg.data.sensor)},
                 "prediction files", has_output=any(out.glob("Scenario_*/VOXEL_GRID_*.npy")),
                 notes={"threshold": threshold,   # what eval-preds scores with by default:
                        "transform": asdict(cfg.transform), "sensor": cfg.data.sensor},   # the checkpoint's
                 flags={"engine": "--engine", "views": "--views"})
    todo = [r for r in split.frames if not prediction_file(out, r).exists()]
    undrawn = [r for r in split.frames if bev and prediction_file(out, r).exists()   # kept without a PNG
               and not prediction_file(out, r).with_suffix(".png").exists()]
    written = drawn = 0
    for ref, _, coords, scores in predict_frames(model, cfg, todo, dev, progress):
        path = prediction_file(out, ref)
        atomic_save_npy(path, prediction_rows(coords, scores))
        written += 1
        if bev:
            draw_bev(ref, coords, scores, cfg, path, threshold)
            drawn += 1
    for ref in undrawn:   # kept from an earlier run: drawn from the saved file, not scored again
        path = prediction_file(out, ref)
        rows = load_npy(path, ncols=4, kinds="f")
        draw_bev(ref, rows[:, :3].astype(np.int64), rows[:, 3], cfg, path, threshold)
        drawn += 1
    skipped = len(todo) - written   # predict_frames yields every frame but those it warned about
    print(f"wrote {written} prediction file(s) under {out} ({len(split.frames) - len(todo)} already there, "
          + (f"{skipped} skipped: failed to load, see the warnings; a rerun retries them)" if skipped else
             "none skipped)")
          + (f"; drew {drawn} bird's-eye PNG(s)" if bev else "")
          + f"; the checkpoint's calibrated threshold {threshold:.6g} is in {out / MANIFEST}, "
          "where eval-preds takes it from")
    return written
