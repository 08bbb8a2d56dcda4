"""End-to-end on the tiny hand-written split: train → resume → predict → eval / eval-preds."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_ad.config import load_config
from sparse_ad.data.anovox import open_split
from sparse_ad.engine.evaluate import Scoring, evaluate_checkpoint, evaluate_predictions
from sparse_ad.engine.train import train
from sparse_ad.errors import SparseADError
from sparse_ad.export import predict_split

TINY = ["train.epochs=2", "data.num_workers=0", "model.channels=[8,16]", "model.blocks_per_level=1",
        "train.batch_size=2", "data.val_fraction=0.5"]


@pytest.fixture
def trained(tiny_split, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", *TINY])
    run = tmp_path / "run"
    summary = train(cfg, run)
    return cfg, run, summary


def test_train_writes_checkpoints_metrics_and_resumes(trained, capsys):
    cfg, run, summary = trained
    for name in ("best.pt", "last.pt", "config.yaml", "history.json", "summary.json"):
        assert (run / name).exists(), name
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    last = history[-1]
    for section in ("normality_included", "anomalies_only"):
        for key in ("auroc", "aupr", "fpr95", "recall", "detections", "positive_rate"):
            assert key in last[section]
    assert last["normality_included"]["anomaly_voxels"] > 0
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and 0 < ck["threshold"] < 1
    capsys.readouterr()
    train(cfg, run)  # same command again: resumes, nothing left to do
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((run / "history.json").read_text()) == history


def test_no_progress_silences_every_bar(trained, tmp_path, monkeypatch, capsys):
    """SPARSE_AD_NO_PROGRESS=1 (CI, batch jobs, docker logs): eval's bar too, not only training's."""
    _, run, _ = trained
    capsys.readouterr()
    monkeypatch.delenv("SPARSE_AD_NO_PROGRESS", raising=False)
    evaluate_checkpoint(run / "best.pt", tmp_path / "a")
    assert "eval:" in capsys.readouterr().err
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    evaluate_checkpoint(run / "best.pt", tmp_path / "b")
    assert "eval:" not in capsys.readouterr().err


def test_eval_batch_size_and_workers_are_range_checked(trained, tmp_path):
    from sparse_ad.errors import ConfigError

    _, run, _ = trained
    with pytest.raises(ConfigError, match=r"train.batch_size: expected a number in \[1, inf\), found 0"):
        evaluate_checkpoint(run / "best.pt", tmp_path / "e", progress=False, scoring=Scoring(batch_size=0))
    with pytest.raises(ConfigError, match=r"data.num_workers: expected .*found -1"):
        evaluate_checkpoint(run / "best.pt", tmp_path / "e", progress=False, scoring=Scoring(workers=-1))


def test_resuming_under_other_settings_is_refused_naming_them(trained, tmp_path):
    """More epochs would hand the finished one-cycle schedule steps it does not have; how the
    machine runs it (workers, log interval, device) may change."""
    from sparse_ad.errors import ConfigError

    cfg, run, _ = trained
    more = load_config("configs/demo.yaml", [f"data.root={cfg.data.root}", *TINY, "train.epochs=3", "optim.lr=0.01"])
    with pytest.raises(ConfigError, match=r"last.pt: this run was started with optim.lr=0.003 \(now 0.01\), "
                                          r"train.epochs=2 \(now 3\); resume it with its own settings"):
        train(more, run)
    same = load_config("configs/demo.yaml", [f"data.root={cfg.data.root}", *TINY, "train.log_every=1"])
    train(same, run)   # nothing left to do, no error


@pytest.mark.parametrize("supervision,weight", [("scene", 1.0), ("voxel", 0.25)])
def test_a_scene_term_is_logged_apart_from_the_voxel_term(tiny_split, tmp_path, monkeypatch, capsys,
                                                          supervision, weight):
    """With a scene head the epoch's loss is reported per term (their scales differ by ~100x
    on real splits: README), and the terms add up to the total with the configured weight."""
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", *TINY, "train.epochs=1",
                                            "model.scene_head=true", f"loss.supervision={supervision}",
                                            f"loss.scene_weight={weight}"])
    train(cfg, tmp_path / "run")
    (entry,) = json.loads((tmp_path / "run" / "history.json").read_text())
    parts = entry["train_loss_parts"]
    assert set(parts) == {"voxel", "scene"} and min(parts.values()) > 0
    assert entry["train_loss"] == pytest.approx(parts["voxel"] + weight * parts["scene"], rel=1e-5)
    assert f"(voxel {parts['voxel']:.4f}, scene {parts['scene']:.4f})" in capsys.readouterr().out


@pytest.mark.parametrize("section,best_epoch", [("anomalies_only", 1), ("normality_included", 2)])
def test_best_checkpoint_follows_the_selected_validation_aupr(tiny_split, tmp_path, monkeypatch, section, best_epoch):
    """Validation AUPRs that disagree between sections (crafted): best.pt follows train.select_on."""
    import sparse_ad.engine.train as train_mod
    from sparse_ad.engine.validate import validate

    def crafted(cfg, rt, model, epoch):
        metrics = validate(cfg, rt, model, epoch)
        metrics["anomalies_only"]["aupr"] = (0.9, 0.1)[epoch]
        metrics["normality_included"]["aupr"] = (0.1, 0.9)[epoch]
        return metrics

    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    monkeypatch.setattr(train_mod, "validate", crafted)
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", *TINY, f"train.select_on={section}"])
    assert train(cfg, tmp_path / "run")["best_epoch"] == best_epoch
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == best_epoch


def test_select_on_must_name_a_section(tmp_path):
    from sparse_ad.errors import ConfigError

    cfg = load_config("configs/demo.yaml", ["train.select_on=accuracy"])
    with pytest.raises(ConfigError, match="train.select_on: expected one of anomalies_only, normality_included"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_eval_holds_out_the_frames_validation_held_out_with_max_frames(tiny_split, tmp_path, monkeypatch):
    """data.max_frames cuts the split before it is divided: eval must divide the same cut,
    or training scenarios would be scored as held-out."""
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", *TINY, "train.epochs=1",
                                            "data.max_frames=7"])
    train(cfg, tmp_path / "run")
    (entry,) = json.loads((tmp_path / "run" / "history.json").read_text())
    result = evaluate_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "eval", progress=False)
    assert result["frames"] == entry["frames"] == 3


def test_predict_then_eval_preds_equals_eval(trained, tmp_path, monkeypatch):
    from sparse_ad import plots

    cfg, run, _ = trained
    drawn_at = []
    real_bev = plots.plot_bev
    monkeypatch.setattr(plots, "plot_bev", lambda *a, **k: drawn_at.append(k["threshold"]) or real_bev(*a, **k))
    ev = evaluate_checkpoint(run / "best.pt", tmp_path / "eval", all_frames=True, progress=False)
    preds = tmp_path / "preds"
    assert (tmp_path / "eval" / "curves.png").stat().st_size > 1000
    binned = evaluate_checkpoint(run / "best.pt", tmp_path / "evalb", all_frames=True, progress=False,
                                 histogram_bins=200_000)
    assert binned["anomalies_only"]["auroc"] == pytest.approx(ev["anomalies_only"]["auroc"], abs=1e-3)
    assert binned["anomalies_only"]["exact"] is False
    assert predict_split(run / "best.pt", cfg.data.root, preds, bev=True, progress=False) == 12
    assert len(list(preds.glob("Scenario_*/VOXEL_GRID_*.png"))) == 12
    assert set(drawn_at) == {ev["threshold"]} != {0.5}   # the calibrated operating point, not p = 0.5
    f = next(preds.glob("Scenario_*/VOXEL_GRID_*.npy"))
    rows = np.load(f, allow_pickle=False)
    assert rows.dtype == np.float32 and rows.shape[1] == 4
    ep = evaluate_predictions(preds, cfg.data.root, tmp_path / "ep.json", cfg, progress=False)
    assert ep["threshold"] == ev["threshold"] != 0.5   # recorded by predict, taken by default
    for section in ("normality_included", "anomalies_only"):
        for key in ("auroc", "aupr", "fpr95", "recall", "voxels", "anomaly_voxels"):
            assert ep[section][key] == pytest.approx(ev[section][key], abs=1e-7), (section, key)
    assert set(ev["by_size"]) == {"large"}  # the fixture's anomaly is 2.0 m at its largest → large
    # one object per anomaly frame, named, and the same from a checkpoint as from its files
    assert ev["objects"]["objects"] == ev["anomaly_frames"] > 0
    names = {r.name for r in open_split(cfg.data.root, need_gt=True).frames}
    assert all(o["frame"] in names and o["size"] == "large" for o in ev["objects"]["worst"])
    assert ep["objects"] == ev["objects"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["frames"] == 12
    # test-time augmentation on request: other scores on the same voxels, and a warning that
    # the stored threshold was calibrated with the checkpoint's own view count
    assert ev["views"] == cfg.model.test_views and ev["engine"] == "spconv" and "graph_captures" not in ev
    views = 2 if cfg.model.test_views != 2 else 4
    with pytest.warns(UserWarning, match="calibrated with"):
        assert predict_split(run / "best.pt", cfg.data.root, tmp_path / "p2", progress=False,
                             scoring=Scoring(views=views)) == 12
    other = np.load(tmp_path / "p2" / f.relative_to(preds), allow_pickle=False)
    np.testing.assert_array_equal(other[:, :3], rows[:, :3])
    assert np.abs(other[:, 3] - rows[:, 3]).max() > 1e-6
    # the gather + GEMM engine scores the same voxels the same (fp32 on CPU)
    assert predict_split(run / "best.pt", cfg.data.root, tmp_path / "pg", progress=False,
                         scoring=Scoring(engine="gather_gemm", batch_size=5, workers=0)) == 12
    gemm = np.load(tmp_path / "pg" / f.relative_to(preds), allow_pickle=False)
    np.testing.assert_array_equal(gemm[:, :3], rows[:, :3])
    np.testing.assert_allclose(gemm[:, 3], rows[:, 3], atol=1e-5)


def test_eval_on_another_split_warns_that_only_its_held_out_share_is_scored(trained, tmp_path):
    import shutil

    cfg, run, _ = trained
    other = tmp_path / "test_split"
    shutil.copytree(cfg.data.root, other)
    with pytest.warns(UserWarning, match=r"is not the split .* only its held-out scenarios are scored \(6 of 12 "
                                         r"frames.*pass --all-frames"):
        evaluate_checkpoint(run / "best.pt", tmp_path / "e", data=other, progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_checkpoint(run / "best.pt", tmp_path / "a", data=other, all_frames=True, progress=False)
        evaluate_checkpoint(run / "best.pt", tmp_path / "s", data=cfg.data.root, progress=False)


def test_predict_resumes_only_with_the_settings_it_started_with(trained, tmp_path):
    import shutil

    from sparse_ad.errors import ConfigError

    cfg, run, _ = trained
    preds = tmp_path / "preds"
    assert predict_split(run / "best.pt", cfg.data.root, preds, progress=False) == 12
    first = sorted(preds.glob("Scenario_*/VOXEL_GRID_*.npy"))[0]
    first.unlink()                                                    # as if interrupted
    assert predict_split(run / "best.pt", cfg.data.root, preds, progress=False) == 1
    views = 2 if cfg.model.test_views != 2 else 4
    with pytest.raises(ConfigError, match=rf"holds prediction files made with other settings: views "
                                          rf"{cfg.model.test_views} \(now {views}\); rerun with --views "
                                          rf"{cfg.model.test_views} to add to them, pick another --out"):
        predict_split(run / "best.pt", cfg.data.root, preds, progress=False, scoring=Scoring(views=views))
    with pytest.raises(ConfigError, match=r"engine 'spconv' \(now 'gather_gemm'\); rerun with --engine spconv "):
        predict_split(run / "best.pt", cfg.data.root, preds, progress=False, scoring=Scoring(engine="gather_gemm"))
    other = tmp_path / "other.pt"
    shutil.copy(run / "best.pt", other)
    with open(other, "ab") as f:
        f.write(b"\0")                                               # another file (torch ignores the tail)
    with pytest.raises(ConfigError, match="checkpoint_sha256"):
        predict_split(other, cfg.data.root, preds, progress=False)
    import os

    lidar = sorted(Path(cfg.data.root).glob("Scenario_*/LIDAR*/*.npy"))[0]
    os.utime(lidar, ns=(lidar.stat().st_atime_ns, lidar.stat().st_mtime_ns + 10**9))   # rewritten in place
    with pytest.raises(ConfigError, match=r"other settings: split "):
        predict_split(run / "best.pt", cfg.data.root, preds, progress=False)
    (preds / "predict.json").unlink()                                 # files of unknown origin
    with pytest.raises(ConfigError, match="holds prediction files but no predict.json"):
        predict_split(run / "best.pt", cfg.data.root, preds, progress=False)


def test_predict_skips_a_broken_frame_and_keeps_the_others_in_order(trained, tmp_path):
    """Frames are loaded by worker processes and scored in batches: a frame that fails to
    load is named in a warning and left out; every other frame gets its own rows."""
    import shutil

    cfg, run, _ = trained
    data = tmp_path / "data"
    shutil.copytree(cfg.data.root, data)
    broken = sorted(data.glob("Scenario_*/LIDAR*/*.npy"))[4]
    broken.write_bytes(broken.read_bytes()[:100])                  # truncated
    from sparse_ad.engine.evaluate import load_checkpoint_model, predict_frames

    model, mcfg, _ = load_checkpoint_model(run / "best.pt", torch.device("cpu"))
    mcfg.train.batch_size, mcfg.data.num_workers = 3, 2
    refs = open_split(data, need_gt=True).frames
    with pytest.warns(UserWarning, match="skipping frame"):
        got = list(predict_frames(model, mcfg, refs, torch.device("cpu"), progress=False))
    broken_ref = (broken.parent.parent, int(broken.stem.rsplit("_", 1)[1]))
    kept = [r.name for r in refs if (r.scenario.path, r.frame) != broken_ref]
    assert len(kept) == len(refs) - 1 and [r.name for r, *_ in got] == kept
    mcfg.train.batch_size, mcfg.data.num_workers = 1, 0                # one frame at a time, in process
    with pytest.warns(UserWarning, match="skipping frame"):
        one = list(predict_frames(model, mcfg, refs, torch.device("cpu"), progress=False))
    for (ra, ka, ca, sa), (rb, kb, cb, sb) in zip(got, one, strict=True):
        assert ra.name == rb.name and np.array_equal(ka, kb) and np.array_equal(ca, cb)
        np.testing.assert_allclose(sa, sb, rtol=0, atol=1e-6)


def test_eval_preds_protocol_on_crafted_grid(tiny_split, tmp_path):
    """Only voxels in both prediction and GT are scored; ignore tags drop out."""
    from sparse_ad.data.anovox import open_split
    from sparse_ad.engine.evaluate import prediction_file

    cfg = load_config(None, [])
    split = open_split(tiny_split, None)
    ref = split.frames[0]
    gt = np.load(ref.scenario.voxel_grid_file(ref.frame))
    # an ego-vehicle voxel (tag 214, ignored) that the prediction scores as high as any anomaly
    gt = np.concatenate([gt, np.array([[500, 500, 32, 214]], np.uint16)])
    np.save(ref.scenario.voxel_grid_file(ref.frame), gt)
    anomalous = gt[:, 3] == 29
    assert anomalous.any()
    # prediction: every GT voxel scored by whether it is an anomaly (the ignored one: 1),
    # plus voxels not in the GT
    extra = np.array([[999, 999, 63, 1.0], [0, 0, 0, 1.0]], np.float32)
    pred = np.concatenate([np.c_[gt[:, :3], anomalous | (gt[:, 3] == 214)].astype(np.float32), extra])
    path = prediction_file(tmp_path / "p", ref)
    path.parent.mkdir(parents=True)
    np.save(path, pred)
    res = evaluate_predictions(tmp_path / "p", tiny_split, tmp_path / "m.json", cfg, progress=False)
    na = res["normality_included"]
    assert na["voxels"] == len(gt) - 1 and na["anomaly_voxels"] == int(anomalous.sum())
    assert na["auroc"] == 1.0 and na["aupr"] == 1.0 and na["recall"] == 1.0 and na["precision"] == 1.0
    assert res["frames"] == 1 and res["missing_predictions"] == len(split.frames) - 1


def test_eval_preds_anomaly_frames_are_the_ones_the_lidar_sees_whatever_a_method_predicts(tiny_split, tmp_path):
    """"Anomalies only" = frames whose anomaly voxels the split's LiDAR hits, decided from the
    split's own LiDAR file, so methods that predict more or fewer voxels share the frames."""
    from sparse_ad.data.anovox import open_split
    from sparse_ad.engine.evaluate import prediction_file

    cfg = load_config(None, [])
    refs = [r for r in open_split(tiny_split, None).frames
            if (np.load(r.scenario.voxel_grid_file(r.frame))[:, 3] == 29).any()]
    a, b, c = refs[:3]
    lidar = a.scenario.sensors_of("LIDAR")[0].file(a.frame)      # a: its LiDAR misses the object
    pts = np.load(lidar)
    np.save(lidar, pts[~((np.abs(pts[:, 0] - 8.75) < 1.5) & (np.abs(pts[:, 1]) < 1.5))])
    c.scenario.sensors_of("LIDAR")[0].file(c.frame).unlink()    # c: no LiDAR file at all
    sizes = {}
    for ref in (a, b, c):
        gt = np.load(ref.scenario.voxel_grid_file(ref.frame))
        if ref is b:                                              # b: a method that predicts none of its voxels
            gt = gt[gt[:, 3] != 29]
        sizes[ref.name] = len(gt)
        path = prediction_file(tmp_path / "p", ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.c_[gt[:, :3], gt[:, 3] == 29].astype(np.float32))   # every GT voxel of a and c
    with pytest.warns(UserWarning, match="1 scored frame.* have no readable LIDAR file"):
        res = evaluate_predictions(tmp_path / "p", tiny_split, tmp_path / "m.json", cfg, progress=False)
    assert res["frames"] == 3 and res["anomaly_frames"] == 2 and res["frames_without_lidar"] == 1
    assert res["anomalies_only"]["voxels"] == sizes[b.name] + sizes[c.name]   # b by its LiDAR, c by its prediction
    ob = res["objects"]   # b's object counts, as missed: the method predicted none of its voxels
    assert (ob["objects"], ob["detected"], ob["median_above_99pct_of_normals"]) == (2, 1, 1)
    assert ob["worst"][0]["frame"] == b.name and ob["worst"][0]["voxels"] == 0
    # the LiDAR is read as predict.json says the model read it: a wrong transform misses both objects
    (tmp_path / "p" / "predict.json").write_text(json.dumps({"threshold": 0.5, "sensor": "LIDAR", "transform": {
        "location_sign": 1.0, "negate_rotation": True, "flip_y": False}}))
    with pytest.warns(UserWarning):
        moved = evaluate_predictions(tmp_path / "p", tiny_split, tmp_path / "m2.json", cfg, progress=False)
    assert moved["anomaly_frames"] == 1   # c alone, by its prediction
    (tmp_path / "p" / "predict.json").write_text('{"method": "another tool"}')   # not ours: needed only without
    with pytest.raises(SparseADError, match=r"predict.json: unreadable .*pass --threshold"):   # a --threshold
        evaluate_predictions(tmp_path / "p", tiny_split, tmp_path / "m4.json", cfg, progress=False)
    with pytest.warns(UserWarning, match="predict.json: unreadable .*--config's transform"):
        assert evaluate_predictions(tmp_path / "p", tiny_split, tmp_path / "m4.json", cfg, threshold=0.3,
                                    progress=False)["anomaly_frames"] == 2
    (tmp_path / "p" / "predict.json").unlink()
    lidar.write_bytes(lidar.read_bytes()[:100])   # a broken LiDAR file: warned, decided by the prediction
    with pytest.warns(UserWarning, match="not a readable .npy file .*decided by its prediction"):
        broken = evaluate_predictions(tmp_path / "p", tiny_split, tmp_path / "m3.json", cfg, progress=False)
    assert broken["anomaly_frames"] == 3 and broken["frames_without_lidar"] == 2


def test_eval_preds_keeps_float64_scores(tiny_split, tmp_path):
    """Scores 1e-9 apart in a float64 file rank as they are (float32 would tie them)."""
    from sklearn.metrics import roc_auc_score

    from sparse_ad.data.anovox import open_split
    from sparse_ad.engine.evaluate import prediction_file

    ref = next(r for r in open_split(tiny_split, None).frames
               if (np.load(r.scenario.voxel_grid_file(r.frame))[:, 3] == 29).any())
    gt = np.load(ref.scenario.voxel_grid_file(ref.frame))
    path = prediction_file(tmp_path / "p", ref)
    path.parent.mkdir(parents=True)
    np.save(path, np.c_[gt[:, :3], 0.5 + 1e-9 * (gt[:, 3] == 29)].astype(np.float64))
    with pytest.warns(UserWarning, match="no prediction file"):
        res = evaluate_predictions(tmp_path / "p", tiny_split, tmp_path / "m.json", load_config(None, []),
                                   progress=False)
    assert res["normality_included"]["auroc"] == roc_auc_score(gt[:, 3] == 29, 0.5 + 1e-9 * (gt[:, 3] == 29)) == 1.0


def test_eval_preds_histogram_mode_matches_exact_on_binned_scores(tiny_split, tmp_path):
    from sparse_ad.data.anovox import open_split
    from sparse_ad.engine.evaluate import prediction_file

    cfg = load_config(None, [])
    rng = np.random.default_rng(0)
    for ref in open_split(tiny_split, None).frames:
        gt = np.load(ref.scenario.voxel_grid_file(ref.frame))
        scores = np.clip(np.round((gt[:, 3] == 29) * 0.6 + rng.uniform(0, 0.5, len(gt)), 2), 0, 1)
        path = prediction_file(tmp_path / "p", ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.c_[gt[:, :3], scores].astype(np.float32))
    exact = evaluate_predictions(tmp_path / "p", tiny_split, tmp_path / "e.json", cfg, progress=False)
    binned = evaluate_predictions(tmp_path / "p", tiny_split, tmp_path / "b.json", cfg, progress=False,
                                  histogram_bins=100_000)
    for key in ("auroc", "aupr", "fpr95", "recall", "voxels"):
        assert binned["normality_included"][key] == pytest.approx(exact["normality_included"][key], abs=1e-4)
    assert binned["normality_included"]["exact"] is False
    # another method's unbounded scores: binned over [0, 1] they would be squashed into the end bins
    np.save(path, np.c_[gt[:, :3], scores * 5 - 2].astype(np.float32))
    from sparse_ad.errors import SparseADError

    with pytest.raises(SparseADError, match=r"/105: scores in \[-2, [.0-9]+\], but histogram mode bins probabilities"):
        evaluate_predictions(tmp_path / "p", tiny_split, tmp_path / "c.json", cfg, progress=False,
                             histogram_bins=1000)


def test_bench_model_smoke():
    from sparse_ad.bench_model import bench_model, format_table

    r = bench_model(None, ["model.channels=[8,16]", "model.blocks_per_level=1", "model.test_views=4"], points=4000,
                    batch_size=1, repeats=1, warmup=0, device="cpu", latency_rounds=3)
    # the numbers' meaning and bookkeeping, not their speed (timings are the tool's output)
    assert r["voxels_per_frame"] > 100 and r["test_views"] == 4 and r["points_per_frame"] == 4000
    assert r["train_frames_per_s"] == pytest.approx(1e3 / r["train_step_ms"])
    s = r["inference_spread_ms"]["inference"]
    assert s["p10"] <= s["median"] == r["inference_ms_per_frame"] <= s["p90"]
    assert set(r["inference_spread_ms"]) >= {"inference_views", "inference_gather_gemm", "eval_batch"}
    assert r["gather_gemm_max_abs_diff"] < 1e-4 and r["graphs_error"] is None   # same probabilities (fp32)
    assert set(r["gather_modes_max_abs_diff"]) == {"gather_gemm@gather", "gather_gemm@bag"}   # no graphs on CPU
    assert all(d < 1e-4 for d in r["gather_modes_max_abs_diff"].values())
    assert set(r["gather_modes_ms_per_frame"]) == {"gather", "bag"} and "gather=bag" in format_table(r)
    assert "training throughput" in format_table(r) and "with 4 test views" in format_table(r)


def test_weight_average_follows_the_weights_with_a_ramped_decay():
    from sparse_ad.engine.ema import WeightAverage

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    avg = WeightAverage(model, decay=0.99)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    avg.update(model, step=1)                  # ramp: decay min(0.99, 2/11)
    d = 2.0 / 11.0
    torch.testing.assert_close(avg.model[0].weight, d * w0 + (1 - d) * (w0 + 1.0))
    assert int(avg.model[1].num_batches_tracked) == 7          # integer buffers are copied
    assert not any(p.requires_grad for p in avg.model.parameters())
    for step in range(2, 2000):
        avg.update(model, step)
    torch.testing.assert_close(avg.model[0].weight, model[0].weight)   # converges to constant weights


def test_ema_checkpoints_export_the_average_and_resume_from_the_raw_weights(tiny_split, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", *TINY, "train.ema_decay=0.9"])
    train(cfg, tmp_path / "run")
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert set(ck["model"]) == set(ck["train_model"])
    assert any(not torch.equal(ck["model"][k], ck["train_model"][k]) for k in ck["model"])
    from sparse_ad.engine.checkpoint import resume_or_init
    from sparse_ad.engine.runtime import setup_runtime

    rt = setup_runtime(cfg, tmp_path / "run")
    resumed = resume_or_init(cfg, tmp_path / "run", rt)
    for k, v in resumed.bare_model.state_dict().items():
        torch.testing.assert_close(v, ck["train_model"][k])
    for k, v in resumed.eval_model.state_dict().items():
        torch.testing.assert_close(v, ck["model"][k])
