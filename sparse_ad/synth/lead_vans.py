"""Does a model see the braking, or only a van ahead? (`tools/lead_vans.py`)

On a synthetic split with sudden-braking scenarios the anomaly is the lead van while it
brakes. A model can score those voxels high without telling braking from cruising: the same
van before it brakes, and the lead vans of other scenarios, are normal voxels that look alike
in one sweep. Pooled AUPR mixes them with every other normal voxel; this splits them out.

The generator's plan (re-drawn from the split's `Scenario_Configuration_Files` entry, which
holds the `sparse-ad synth` arguments) says where the lead van is in every frame, so each
predicted voxel inside its footprint (ego lane, van length and width + 0.5 m) with a vehicle
or anomaly ground-truth tag is put in one category:

    braking              tag 100: the van during its braking interval (the anomaly)
    same van, other      the braking scenario's van before it brakes (or after it stopped)
    other lead vans      lead vans in the ego lane in scenarios without braking

and reported with its median score, the share above the checkpoint's threshold, and the share
above the 99th percentile of all scored normal voxels (threshold-free). Mono splits only
(the footprint is taken in the one sensor set's grid frame).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sparse_ad.config import load_config
from sparse_ad.data.anovox import open_split
from sparse_ad.data.files import load_voxel_grid
from sparse_ad.data.labels import ANOMALY, IGNORE, GroundTruth, lookup_tags, target_table, targets_from_tags
from sparse_ad.errors import ConfigError, reported
from sparse_ad.grid import VoxelGrid
from sparse_ad.io import atomic_write_text
from sparse_ad.synth import CONFIG_FILE, CONFIG_FOLDER, plan_split
from sparse_ad.synth.scenario import BRAKING_TAG, Plan
from sparse_ad.synth.scene import CAR, TRUCK

CATEGORIES = ("braking", "same van, other frames", "other lead vans")
VAN_TAGS = (CAR, TRUCK, BRAKING_TAG)
MARGIN = 0.5
"""Metres around the van's body box that still count as the van (voxels are 0.5 m)."""


def replan(root: Path) -> dict[str, Plan]:
    """scenario id → the generator's plan, from the split's own synth arguments."""
    path = Path(root) / CONFIG_FOLDER / CONFIG_FILE
    try:
        synth = json.loads(path.read_text())["synth"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{path}: not found or without a 'synth' entry; this analysis needs a split written by "
                          "`sparse-ad synth` (its plan says where the lead van is)") from None
    if synth.get("sensor_sets", "mono") != "mono":
        raise ConfigError(f"{path}: sensor_sets {synth['sensor_sets']!r}; the lead-van footprint is measured on "
                          "mono splits only (write one with --sensor-sets mono)")
    plans = plan_split(int(synth["scenarios"]), int(synth["frames"]), int(synth["seed"]), synth["anomaly_share"],
                       synth.get("braking_share", 0.0))
    return {p.scenario_id: p for p in plans}


def lead_van_mask(plan: Plan, k: int, coords: np.ndarray, tags: np.ndarray, grid: VoxelGrid) -> np.ndarray:
    """Voxels (coords on `grid`, their GT tags) of the lead van in frame k, while it is in the
    ego lane; none when the scenario has no lead van or it has changed lanes."""
    if plan.lead_group < 0:
        return np.zeros(len(coords), bool)
    lead = plan.offsets[k][plan.lead_group]
    if abs(lead[1] - plan.street.ego_lane_y) > 0.1:
        return np.zeros(len(coords), bool)
    half = plan.prims.half[plan.prims.group == plan.lead_group].max(axis=0)
    centre = (coords + 0.5) * grid.resolution - np.asarray(grid.offset)   # grid frame: x ahead of the sensor
    return ((np.abs(centre[:, 0] - (lead[0] - plan.ego_x[k])) < half[0] + MARGIN)
            & (np.abs(centre[:, 1]) < half[1] + MARGIN) & np.isin(tags, VAN_TAGS))


def lead_van_scores(root: Path, pred_dir: Path, threshold: float | None = None, config: str | None = None) -> dict:
    """Per category: voxels, median score, share above `threshold`, share above the 99th
    percentile of the scored normal voxels (predicted voxels the GT has, ignore tags dropped)."""
    from sparse_ad.engine.evaluate import load_prediction, prediction_file

    cfg = load_config(config, [])
    grid, lut = cfg.grid.build(), target_table(cfg.labels.anomaly_tags, cfg.labels.ignore_tags)
    plans = replan(root)
    scores = {c: [] for c in CATEGORIES}
    normal = []
    for ref in open_split(root, None).frames:
        plan = plans.get(ref.scenario.id)
        if plan is None:
            raise ConfigError(f"{ref.scenario.path}: not in {CONFIG_FOLDER}/{CONFIG_FILE}; analyse the split "
                              "as `sparse-ad synth` wrote it")
        keys, s = load_prediction(prediction_file(Path(pred_dir), ref), grid)
        gt_file = ref.scenario.voxel_grid_file(ref.frame)
        gt = GroundTruth.from_rows(load_voxel_grid(gt_file), grid, str(gt_file))
        tags = lookup_tags(keys, gt)
        targets = targets_from_tags(tags, lut)
        normal.append(s[(tags >= 0) & (targets != IGNORE) & (targets != ANOMALY)])
        k = plan.frame_ids.index(ref.frame)
        van = (tags >= 0) & lead_van_mask(plan, k, grid.decode(keys), tags, grid)
        if plan.kind == "braking":
            scores["braking" if plan.anomaly_frames[k] else "same van, other frames"].append(s[van])
        else:
            scores["other lead vans"].append(s[van])
    q99 = float(np.quantile(np.concatenate(normal), 0.99))
    out = {"pred_dir": str(pred_dir), "threshold": threshold, "normal_q99": q99, "categories": {}}
    for c, parts in scores.items():
        v = np.concatenate(parts) if parts else np.zeros(0)
        out["categories"][c] = {
            "voxels": int(len(v)), "median": float(np.median(v)) if len(v) else None,
            "above_threshold": float(np.mean(v > threshold)) if len(v) and threshold is not None else None,
            "above_normal_q99": float(np.mean(v > q99)) if len(v) else None}
    return out


def _num(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def format_rows(results: list[dict]) -> str:
    lines = ["| predictions | category | voxels | median score | > threshold | > 99% of normal voxels |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for c, v in r["categories"].items():
            lines.append(f"| {r['pred_dir']} | {c} | {v['voxels']} | {_num(v['median'])} | "
                         f"{_num(v['above_threshold'])} | {_num(v['above_normal_q99'])} |")
    return "\n".join(lines)


@reported("lead_vans")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="scores of the lead van on a synthetic split with sudden braking: while braking, the same van "
                    "otherwise, other lead vans (example: python tools/lead_vans.py --split runs/braking_test "
                    "--checkpoint runs/k3/best.pt --out runs/lead_vans.json)")
    p.add_argument("--split", type=Path, required=True, help="a split written by `sparse-ad synth --braking-share ...`")
    p.add_argument("--checkpoint", type=Path, action="append", required=True,
                   help="a checkpoint (repeat to compare); predictions go to OUT's folder and are reused")
    p.add_argument("--out", type=Path, default=Path("runs/lead_vans.json"))
    a = p.parse_args(argv)
    from sparse_ad.engine.checkpoint import load
    from sparse_ad.export import predict_split

    replan(a.split)   # a split it cannot analyse is refused before any prediction is made
    results = []
    for ck in a.checkpoint:
        pred_dir = a.out.parent / f"{a.out.stem}_preds" / str(ck.with_suffix("")).strip("/").replace("/", "_")
        predict_split(ck, a.split, pred_dir, progress=False)
        results.append(lead_van_scores(a.split, pred_dir, float(load(ck)["threshold"])) | {"checkpoint": str(ck)})
    print(format_rows(results))
    atomic_write_text(a.out, json.dumps(results, indent=2))
    print(f"wrote {a.out}")
    return 0
