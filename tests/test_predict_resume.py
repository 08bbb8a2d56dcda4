"""`predict` resumed: PNGs for kept prediction files, and frames that failed to load counted."""

import shutil

import numpy as np
import pytest

from sparse_ad.config import load_config
from sparse_ad.engine.evaluate import prediction_file
from sparse_ad.engine.train import train
from sparse_ad.export import predict_split

TINY = ["train.epochs=1", "data.num_workers=0", "model.channels=[8,16]", "model.blocks_per_level=1",
        "train.batch_size=2", "data.val_fraction=0.5"]


@pytest.fixture
def checkpoint(tiny_split, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    train(load_config("configs/demo.yaml", [f"data.root={tiny_split}", *TINY]), tmp_path / "run")
    return tmp_path / "run" / "best.pt"


def test_bev_draws_the_missing_pngs_of_kept_files_from_the_files(checkpoint, tiny_split, tmp_path, monkeypatch,
                                                                 capsys):
    """A run stopped between a frame's .npy and its PNG (or run without --bev) leaves .npy files
    without pictures: `--bev` draws them from the saved rows, without scoring those frames again."""
    from sparse_ad import plots
    from sparse_ad.engine import evaluate

    preds = tmp_path / "preds"
    assert predict_split(checkpoint, tiny_split, preds, progress=False) == 12   # no --bev: no PNGs
    files = sorted(preds.glob("Scenario_*/VOXEL_GRID_*.npy"))
    assert len(files) == 12 and not list(preds.glob("Scenario_*/*.png"))
    files[0].unlink()                                                # as if interrupted before this frame
    saved = {f.with_suffix(".png"): np.load(f, allow_pickle=False) for f in files[1:]}
    scored, drawn = [], {}
    real_predict, real_bev = evaluate.predict_frames, plots.plot_bev
    monkeypatch.setattr(evaluate, "predict_frames", lambda m, c, refs, *a: scored.extend(refs)
                        or real_predict(m, c, refs, *a))
    monkeypatch.setattr(plots, "plot_bev", lambda coords, scores, gt, cfg, path, **k: drawn.update(
        {path: (coords, scores)}) or real_bev(coords, scores, gt, cfg, path, **k))
    capsys.readouterr()
    assert predict_split(checkpoint, tiny_split, preds, bev=True, progress=False) == 1
    assert [prediction_file(preds, r) for r in scored] == [files[0]]   # only the missing frame is scored
    assert set(drawn) == {f.with_suffix(".png") for f in files}
    assert "(11 already there, none skipped); drew 12 bird's-eye PNG(s);" in capsys.readouterr().out
    for png, rows in saved.items():
        np.testing.assert_array_equal(drawn[png][0], rows[:, :3])
        np.testing.assert_array_equal(drawn[png][1], rows[:, 3])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(preds.glob("Scenario_*/.*.tmp"))                 # written atomically, nothing left over
    drawn.clear()
    assert predict_split(checkpoint, tiny_split, preds, bev=True, progress=False) == 0
    assert not drawn and "drew 0 bird's-eye PNG(s)" in capsys.readouterr().out


def test_the_summary_counts_the_frames_that_failed_to_load(checkpoint, tiny_split, tmp_path, capsys):
    """One warning per broken frame scrolls away on a real split: the last line counts them,
    and a rerun (which retries them) counts them again."""
    data = tmp_path / "data"
    shutil.copytree(tiny_split, data, copy_function=shutil.copy2)
    broken = sorted(data.glob("Scenario_*/LIDAR*/*.npy"))[4]
    broken.write_bytes(broken.read_bytes()[:100])                    # truncated
    capsys.readouterr()
    for kept in (0, 11):
        with pytest.warns(UserWarning, match="skipping frame"):
            assert predict_split(checkpoint, data, tmp_path / "p", progress=False) == (11 if kept == 0 else 0)
        assert (f"({kept} already there, 1 skipped: failed to load, see the warnings; a rerun retries them)"
                in capsys.readouterr().out)
    assert len(list((tmp_path / "p").glob("Scenario_*/VOXEL_GRID_*.npy"))) == 11


def test_a_broken_ground_truth_file_costs_eval_its_frame_not_predict(checkpoint, tiny_split, tmp_path, capsys):
    """`predict` needs no ground truth, so a truncated VOXEL_GRID does not cost it the frame;
    `eval` skips that frame with a warning naming the file and counts it in skipped_frames."""
    from sparse_ad.engine.evaluate import evaluate_checkpoint

    data = tmp_path / "data"
    shutil.copytree(tiny_split, data, copy_function=shutil.copy2)
    broken = sorted(data.glob("Scenario_*/VOXEL_GRID/*.npy"))[4]
    broken.write_bytes(broken.read_bytes()[:100])                    # truncated
    assert predict_split(checkpoint, data, tmp_path / "p", progress=False) == 12
    assert "none skipped" in capsys.readouterr().out
    with pytest.warns(UserWarning, match=f"skipping frame: {broken}"):
        result = evaluate_checkpoint(checkpoint, tmp_path / "ev", data=data, all_frames=True, progress=False)
    assert result["skipped_frames"] == 1 and result["frames"] == 11
