"""What `eval` and `eval-preds` leave unscored is said, in a warning, the summary line and the
JSON: frames that failed to load, frames without a prediction file, prediction files that
match no frame, and predictions `predict` made from another version of the split."""

import json
import os
import warnings

import numpy as np
import pytest
import torch

from sparse_ad.config import config_to_dict, load_config
from sparse_ad.data.anovox import open_split
from sparse_ad.engine.evaluate import evaluate_checkpoint, evaluate_predictions, prediction_file

ANOTHER_SPLIT = "the predictions were made on another version of the split"


@pytest.fixture
def checkpoint(tiny_split, tmp_path, monkeypatch):
    """An untrained slim model saved as `train` saves one (no training: only the plumbing is tested)."""
    from sparse_ad.models.spunet import build_model

    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "data.num_workers=0", "model.channels=[8,16]",
                                            "model.blocks_per_level=1", "model.test_views=1", "train.batch_size=4"])
    torch.manual_seed(0)
    path = tmp_path / "best.pt"
    torch.save({"format": 1, "epoch": 1, "threshold": 0.5, "model": build_model(cfg.model).state_dict(),
                "config": config_to_dict(cfg)}, path)
    return path


def _gt_as_predictions(split, pred_dir, leave_out: int = 0) -> None:
    """Every frame's GT voxels scored by whether they are anomalies, but the last `leave_out` frames'."""
    refs = open_split(split, None).frames
    for ref in refs[:len(refs) - leave_out]:
        gt = np.load(ref.scenario.voxel_grid_file(ref.frame))
        path = prediction_file(pred_dir, ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.c_[gt[:, :3], gt[:, 3] == 29].astype(np.float32))


def _warned(fn, *args, **kwargs) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [str(w.message) for w in caught]


def test_eval_preds_warns_when_predict_made_the_files_from_another_version_of_the_split(tiny_split, tmp_path,
                                                                                         checkpoint):
    from sparse_ad.export import predict_split

    cfg = load_config(None, [])
    preds = tmp_path / "preds"
    assert predict_split(checkpoint, tiny_split, preds, progress=False) == 12
    _, said = _warned(evaluate_predictions, preds, tiny_split, tmp_path / "a.json", cfg, progress=False)
    assert not [m for m in said if ANOTHER_SPLIT in m]   # the same split: its fingerprint computed as predict's
    manifest = json.loads((preds / "predict.json").read_text())
    old = {k: v for k, v in manifest.items() if k not in ("sensor", "transform")}   # an older predict.json
    (preds / "predict.json").write_text(json.dumps(old))
    semantic = load_config(None, ["data.sensor=SEMANTIC-LIDAR"])   # predict read LIDAR whatever eval-preds is told
    _, said = _warned(evaluate_predictions, preds, tiny_split, tmp_path / "old.json", semantic, progress=False)
    assert not [m for m in said if ANOTHER_SPLIT in m]
    (preds / "predict.json").write_text(json.dumps(manifest))
    lidar = sorted(tiny_split.glob("Scenario_*/LIDAR*/*.npy"))[0]
    os.utime(lidar, ns=(lidar.stat().st_atime_ns, lidar.stat().st_mtime_ns + 10**9))   # rewritten in place
    _, said = _warned(evaluate_predictions, preds, tiny_split, tmp_path / "b.json", cfg, progress=False)
    [line] = [m for m in said if ANOTHER_SPLIT in m]
    assert line.startswith(f"{preds / 'predict.json'}: ") and "re-run predict into a new folder" in line
    assert "\n" not in line
    (preds / "predict.json").unlink()   # another method's files: nothing recorded, nothing to check
    _, said = _warned(evaluate_predictions, preds, tiny_split, tmp_path / "c.json", cfg, progress=False)
    assert not [m for m in said if ANOTHER_SPLIT in m]


def test_eval_preds_counts_prediction_files_that_match_no_frame(tiny_split, tmp_path, capsys):
    cfg = load_config(None, [])
    preds = tmp_path / "p"
    _gt_as_predictions(tiny_split, preds)
    res = evaluate_predictions(preds, tiny_split, tmp_path / "a.json", cfg, progress=False)
    assert res["unmatched_prediction_files"] == 0
    first = next(preds.glob("Scenario_*/VOXEL_GRID_*.npy"))
    (preds / "Scenario_elsewhere").mkdir()
    (preds / "Scenario_elsewhere" / "VOXEL_GRID_7.npy").write_bytes(first.read_bytes())   # another split's scenario
    (first.parent / "VOXEL_GRID_0100.npy").write_bytes(first.read_bytes())              # not AnoVox's frame name
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"^2 prediction file\(s\) under .* match no frame of .* are not scored "
                                         r"\(e\.g\. .*VOXEL_GRID_0100\.npy\)"):
        res = evaluate_predictions(preds, tiny_split, tmp_path / "b.json", cfg, progress=False)
    assert res["unmatched_prediction_files"] == 2 and res["frames"] == 12   # the others scored as before
    assert json.loads((tmp_path / "b.json").read_text())["unmatched_prediction_files"] == 2
    assert "| 2 prediction file(s) matching no frame" in capsys.readouterr().out


def test_eval_preds_summary_line_counts_frames_without_a_prediction_file(tiny_split, tmp_path, capsys):
    _gt_as_predictions(tiny_split, tmp_path / "p", leave_out=2)
    with pytest.warns(UserWarning, match="2 frame.* have no prediction file"):
        res = evaluate_predictions(tmp_path / "p", tiny_split, tmp_path / "m.json", load_config(None, []),
                                   progress=False)
    assert res["missing_predictions"] == 2 and res["frames"] == 10
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("threshold ")]
    assert summary == ["threshold 0.5 | frames 10 (6 with anomalies) | 2 frame(s) without a prediction file "
                       "| 0 prediction file(s) matching no frame"]


def test_eval_counts_frames_that_failed_to_load(tiny_split, tmp_path, checkpoint, capsys):
    broken = sorted(tiny_split.glob("Scenario_*/LIDAR*/*.npy"))[4]
    broken.write_bytes(broken.read_bytes()[:100])   # truncated
    with pytest.warns(UserWarning, match="skipping frame"):
        res = evaluate_checkpoint(checkpoint, tmp_path / "eval", all_frames=True, progress=False)
    assert res["frames"] == 11 and res["skipped_frames"] == 1
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["skipped_frames"] == 1
    assert "| 1 frame(s) skipped (failed to load)" in capsys.readouterr().out
