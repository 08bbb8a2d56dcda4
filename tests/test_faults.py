"""Crashes, restarts, broken files and determinism (issue: reliability)."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_ad.config import load_config
from sparse_ad.engine import checkpoint as ckpt
from sparse_ad.engine.train import train
from sparse_ad.errors import ConfigError, SparseADError
from sparse_ad.io import atomic_save_npy
from tests.conftest import MONO, stop_flag_set_at_read

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.num_workers=0", "model.channels=[8,16]", "model.blocks_per_level=1", "train.batch_size=2",
        "data.val_fraction=0.5"]


def _history(run: Path) -> list:
    return json.loads((run / "history.json").read_text())


def _metrics_only(history: list) -> list:
    return [{k: v for k, v in h.items() if k not in ("skipped_frames",)} for h in history]


def test_same_seed_same_metrics_on_cpu(tiny_split, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "train.epochs=2", *TINY])
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")
    assert _history(tmp_path / "a") == _history(tmp_path / "b")


def _train_cmd(split: Path, run: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "sparse_ad.cli", "train", "--config", str(ROOT / "configs/demo.yaml"),
            "--run-dir", str(run), f"data.root={split}", f"train.epochs={epochs}", *TINY]


def test_sigkill_then_same_command_resumes_to_the_same_metrics(tiny_split, tmp_path):
    env = {**os.environ, "SPARSE_AD_NO_PROGRESS": "1"}
    epochs = 3
    ref = subprocess.run(_train_cmd(tiny_split, tmp_path / "ref", epochs), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(tiny_split, run, epochs), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    again = subprocess.run(_train_cmd(tiny_split, run, epochs), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout
    assert _metrics_only(_history(run)) == _metrics_only(_history(tmp_path / "ref"))


def test_sigterm_finishes_the_step_saves_and_exits_143(tiny_split, tmp_path):
    env = {**os.environ, "SPARSE_AD_NO_PROGRESS": "1"}
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(tiny_split, run, 50), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]   # saved, but not finished: not 0
    assert "last.pt saved" in out and "Traceback" not in err
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["epoch"] < 50


def test_corrupt_last_checkpoint_is_reported_not_loaded(tmp_path):
    p = tmp_path / "last.pt"
    p.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(SparseADError, match="corrupt or not a sparse_ad checkpoint"):
        ckpt.load(p)
    torch.save({"format": 1}, p)
    with pytest.raises(SparseADError, match="not a sparse_ad checkpoint"):
        ckpt.load(p)
    # the fix named fits the command: scoring a checkpoint is not resuming a run
    with pytest.raises(SparseADError, match=r"corrupt .*; pass a best.pt or last.pt that `sparse-ad train` wrote$"):
        ckpt.load(_corrupt(tmp_path / "best.pt"))
    with pytest.raises(SparseADError, match=r"checkpoint not found; pass a best.pt"):
        ckpt.load(tmp_path / "none.pt")
    with pytest.raises(SparseADError, match=r"is a folder; pass the checkpoint file in it, e.g. .*best.pt"):
        ckpt.load(tmp_path)


def _corrupt(path):
    path.write_bytes(b"PK\x03\x04 truncated")
    return path


def test_a_corrupt_last_pt_says_how_to_start_over(tiny_split, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _corrupt(run / "last.pt")
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "train.epochs=1", *TINY])
    with pytest.raises(SparseADError, match=r"last.pt: corrupt .*; move it away to start fresh \(best.pt may still"):
        train(cfg, run)


def test_disk_full_during_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "x.npy"
    atomic_save_npy(target, np.arange(4))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SparseADError, match="No space left"):
        atomic_save_npy(target, np.arange(10))
    assert np.array_equal(np.load(target), np.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]  # no temp file left behind


def test_broken_frames_are_skipped_counted_and_bounded(tiny_split, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    lidar = sorted(tiny_split.glob("Scenario_*/LIDAR*/*.npy"))
    lidar[0].write_bytes(b"")  # truncated
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "train.epochs=1",
                                            "data.max_skip_fraction=0.5", *TINY])
    summary = train(cfg, tmp_path / "ok")
    assert "frame loads skipped" in capsys.readouterr().out
    assert summary["skipped_frames"] >= 1
    assert train(cfg, tmp_path / "ok")["skipped_frames"] == summary["skipped_frames"]   # a rerun says so too
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "train.epochs=1",
                                            "data.max_skip_fraction=0.0", *TINY])
    with pytest.raises(SparseADError, match="max_skip_fraction"):
        train(cfg, tmp_path / "strict")
    with pytest.raises(SparseADError, match="train into a new --run-dir"):   # stays refused (it passed: 0 of 0)
        train(cfg, tmp_path / "strict")
    assert "by an earlier run into this folder" in capsys.readouterr().out


class _Pgid(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return os.getpgid(0)


def test_training_loader_workers_leave_the_ranks_process_group_under_torchrun(monkeypatch):
    """torchrun passes a stop signal on to a rank's process group; the workers in it died (torch
    takes a SIGTERM its parent did not send for a crash) and the rank with them, unsaved."""
    from torch.utils.data import DataLoader

    from sparse_ad.engine.runtime import loader_worker_init

    assert loader_worker_init() is None                   # one process: workers stay as they were
    monkeypatch.setenv("WORLD_SIZE", "2")
    pgids = list(DataLoader(_Pgid(), batch_size=None, num_workers=1, worker_init_fn=loader_worker_init(),
                            multiprocessing_context="fork"))
    assert len(pgids) == 2 and os.getpgid(0) not in pgids


def test_a_second_signal_gives_up_at_once_except_under_ddp():
    """Under torchrun a rank gets two signals for one stop (the scheduler's and torchrun's
    forwarded one): it must still save last.pt."""
    from sparse_ad.engine.train import _StopFlag

    alone, ddp = _StopFlag(), _StopFlag(escalate=False)
    for flag in (alone, ddp):
        flag._handle(signal.SIGTERM, None)
        assert flag.set and flag.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        alone._handle(signal.SIGTERM, None)
    ddp._handle(signal.SIGTERM, None)
    assert ddp.set


def test_nan_points_are_dropped_not_trained_on(tiny_split, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    f = sorted(tiny_split.glob("Scenario_*/LIDAR*/*.npy"))[0]
    pts = np.load(f)
    pts[:10, 0] = np.nan
    pts[10:20, 2] = np.inf
    np.save(f, pts)
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "train.epochs=1", *TINY])
    from sparse_ad.data.anovox import open_split
    from sparse_ad.data.dataset import FrameDataset

    refs = [r for r in open_split(tiny_split).frames if r.scenario.path == f.parents[1]]
    frame = next(r for r in refs if f.name.endswith(f"_{r.frame}.npy"))
    sample = FrameDataset([frame], cfg, train=True)[0]       # augmented, as training reads it
    assert len(sample.points) == len(pts) - 20 == len(sample.point_targets)
    assert np.isfinite(sample.points).all()
    summary = train(cfg, tmp_path / "r")
    assert np.isfinite(summary["best"]["train_loss"])


def _die_on_frame(monkeypatch, record: Path, train: bool, nth: int) -> None:
    """Make a loader worker SIGKILL itself when it starts loading the `nth` frame of the
    train (or non-train) dataset; the frame's name goes to `record` first."""
    from sparse_ad.data import dataset as ds_mod

    original = ds_mod.FrameDataset._load

    def crash(self, index, ref):
        if self.train == train and index == nth:
            record.write_text(ref.name)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, index, ref)

    monkeypatch.setattr(ds_mod.FrameDataset, "_load", crash)


@pytest.mark.parametrize("nth", [0, 5])
def test_a_dying_loader_worker_is_reported_with_its_frame(tiny_split, tmp_path, monkeypatch, nth):
    """A worker killed by a signal mid-load: the error names that frame and only that one."""
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    _die_on_frame(monkeypatch, tmp_path / "died_on", train=True, nth=nth)
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "train.epochs=1", *TINY,
                                            "data.num_workers=2"])
    with pytest.raises(SparseADError, match="data loader worker died") as err:
        train(cfg, tmp_path / "r")
    name = (tmp_path / "died_on").read_text()
    assert f"while loading frame {name} (" in str(err.value)
    assert str(err.value).count("frame ") == 1


def test_a_worker_dying_in_validation_or_eval_is_named_too(tiny_split, tmp_path, monkeypatch):
    from sparse_ad.engine.evaluate import Scoring, evaluate_checkpoint

    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "train.epochs=1", *TINY])
    train(cfg, tmp_path / "r")
    _die_on_frame(monkeypatch, tmp_path / "died_on", train=False, nth=1)
    with pytest.raises(SparseADError, match="while loading frame .*; check its files") as err:
        evaluate_checkpoint(tmp_path / "r" / "best.pt", tmp_path / "eval", progress=False,
                            scoring=Scoring(workers=1))
    assert f"frame {(tmp_path / 'died_on').read_text()} (" in str(err.value)


def test_a_worker_death_outside_a_load_says_so():
    from sparse_ad.data.in_flight import naming_dead_workers

    with pytest.raises(SparseADError, match="outside a frame load; run with data.num_workers=0"):
        with naming_dead_workers():
            raise RuntimeError("DataLoader worker (pid(s) 999999, 999998) exited unexpectedly")
    with pytest.raises(RuntimeError, match="^something else$"):
        with naming_dead_workers():
            raise RuntimeError("something else")


def test_ddp_through_torchrun_on_cpu(tmp_path, monkeypatch):
    """Two gloo processes, one code path: both train and validate, rank 0 writes — the
    synthetic split too (both writing it into the cache deleted each other's folders). The
    run then resumes only with as many processes (its schedule counts their steps)."""
    env = {**os.environ, "SPARSE_AD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "SPARSE_AD_CACHE": str(tmp_path)}
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    overrides = ["data.synth_scenarios=4", "data.synth_frames=2", "train.epochs=2", "train.max_minutes=0.0001",
                 *TINY]
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(ROOT / "tools/train.py"), "--config",
                        str(ROOT / "configs/demo.yaml"), "--run-dir", str(run), *overrides],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes" in r.stdout and r.stdout.count("writing a synthetic AnoVox-layout split") == 1
    assert [h["epoch"] for h in _history(run)] == [1]   # the time budget stopped it after epoch 1
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setenv("SPARSE_AD_CACHE", str(tmp_path))
    cfg = load_config("configs/demo.yaml", overrides)
    with pytest.raises(ConfigError, match=r"last.pt: this run was trained with processes 2, steps_per_epoch 1, "
                                          r"this command has processes 1, steps_per_epoch 2; resume it with"):
        train(cfg, run)


def test_a_kill_before_last_pt_leaves_best_pt_and_history_of_the_epoch(tiny_split, tmp_path, monkeypatch):
    """last.pt is written last: a kill just before it must not leave a last.pt that claims a
    best epoch whose best.pt (or history entry) never reached the disk."""
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "train.epochs=1", *TINY])
    real_save = ckpt.save

    def killed_at_last_pt(path, *a, **k):
        if Path(path).name == "last.pt":
            raise KeyboardInterrupt("killed")
        real_save(path, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(ckpt, "save", killed_at_last_pt)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "best.pt").exists() and [h["epoch"] for h in _history(tmp_path / "run")] == [1]
    assert not (tmp_path / "run" / "last.pt").exists()
    train(cfg, tmp_path / "run")                  # the rerun redoes the epoch and ends consistent
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == 1
    assert [h["epoch"] for h in _history(tmp_path / "run")] == [1]


def test_frames_without_a_point_in_the_grid_are_passed_over_alone_in_a_batch(tiny_split, tmp_path, monkeypatch):
    """A frame whose points are all NaN (or outside the grid) has no voxel: alone in a batch
    it skips the step (train), scores nothing (eval) and gets an empty prediction file."""
    from sparse_ad.engine.evaluate import Scoring, evaluate_checkpoint
    from sparse_ad.export import predict_split

    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    for sc in sorted(tiny_split.glob(f"Scenario_*/{MONO}")):   # the first frame of every scenario
        lidar = sorted(sc.glob("*.npy"))[0]
        pts = np.load(lidar)
        pts[:, :3] = np.nan
        np.save(lidar, pts)
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "train.epochs=1", *TINY,
                                            "train.batch_size=1"])
    train(cfg, tmp_path / "run")
    assert _history(tmp_path / "run")[0]["skipped_steps"] == 2   # the two training scenarios' empty frames
    res = evaluate_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "eval", all_frames=True, progress=False,
                              scoring=Scoring(batch_size=1))
    assert res["frames"] == 12
    assert predict_split(tmp_path / "run" / "best.pt", tiny_split, tmp_path / "p", progress=False,
                         scoring=Scoring(batch_size=1)) == 12
    rows = sorted(len(np.load(f)) for f in (tmp_path / "p").glob("*/*.npy"))
    assert rows[:4] == [0, 0, 0, 0] and rows[4] > 1000


def test_the_time_budget_counts_across_resumes(tiny_split, tmp_path, monkeypatch, capsys):
    """A run the budget ended is finished: rerunning it (a study resumed after an interrupted
    evaluation) trains no more, unless the budget is raised (a runtime setting)."""
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    over = [f"data.root={tiny_split}", "train.epochs=3", *TINY]
    train(load_config("configs/demo.yaml", [*over, "train.max_minutes=0.0001"]), tmp_path / "run")
    assert [h["epoch"] for h in _history(tmp_path / "run")] == [1]
    capsys.readouterr()
    train(load_config("configs/demo.yaml", [*over, "train.max_minutes=0.0001"]), tmp_path / "run")
    assert "time budget of 0.0001 min reached after epoch 1" in capsys.readouterr().out
    assert [h["epoch"] for h in _history(tmp_path / "run")] == [1]
    train(load_config("configs/demo.yaml", [*over, "train.max_minutes=0"]), tmp_path / "run")
    assert [h["epoch"] for h in _history(tmp_path / "run")] == [1, 2, 3]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["minutes"] > 0

    # an epoch stopped part-way (and past the budget by then) is finished on resume, not dropped
    from sparse_ad.engine import train as train_mod

    cfg = load_config("configs/demo.yaml", [*over, "train.max_minutes=0.0001"])
    with monkeypatch.context() as m:
        m.setattr(train_mod, "_StopFlag", stop_flag_set_at_read(2))   # before step 1 of epoch 1
        assert train(cfg, tmp_path / "stopped")["stopped"]
    train(cfg, tmp_path / "stopped")
    assert [h["epoch"] for h in _history(tmp_path / "stopped")] == [1] and (tmp_path / "stopped" / "best.pt").exists()


def test_a_config_refused_while_setting_up_leaves_no_empty_run_folder(tiny_split, tmp_path):
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "data.sweeps=2", *TINY])
    with pytest.raises(ConfigError, match="set model.in_channels=7"):
        train(cfg, tmp_path / "new" / "run")
    assert not (tmp_path / "new" / "run").exists()
    (tmp_path / "mine").mkdir()                       # a folder the user made is left alone
    with pytest.raises(ConfigError):
        train(cfg, tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()


def test_only_rank_0_makes_the_run_folder(tiny_split, tmp_path, monkeypatch):
    """Under torchrun another rank made the folder too, and could remake it after rank 0 had
    removed it for a refused config (seen in 2 of 3 torchrun tries)."""
    monkeypatch.setenv("RANK", "1")   # as rank 1 sees it (WORLD_SIZE unset: no process group needed)
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "data.sweeps=2", *TINY])
    with pytest.raises(ConfigError, match="set model.in_channels=7"):
        train(cfg, tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()


def test_non_finite_loss_stops_with_step_frames_and_hint(tiny_split, tmp_path, monkeypatch):
    from sparse_ad.engine import checkpoint as ck_mod

    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    real_build = ck_mod.TrainState

    class NanLoss:
        def __call__(self, out, targets):
            return out.voxel_logits.sum() * float("nan"), {}

    def state_with_nan_loss(*a, **k):
        k["loss_fn"] = NanLoss()
        return real_build(*a, **k)

    monkeypatch.setattr(ck_mod, "TrainState", state_with_nan_loss)
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "train.epochs=1", *TINY])
    with pytest.raises(SparseADError, match=r"non-finite loss nan at step 0 on frames .*/10.*optim.lr"):
        train(cfg, tmp_path / "r")
    assert not (tmp_path / "r" / "last.pt").exists()  # nothing trained on garbage was saved


def test_a_stop_mid_epoch_resumes_to_the_same_history(tiny_split, tmp_path, monkeypatch):
    """SIGINT/SIGTERM mid-epoch, then the same command: the resumed epoch's loss and counts
    include the steps done before the stop, so history.json equals an uninterrupted run's."""
    from sparse_ad.engine import train as train_mod

    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "train.epochs=2", *TINY])
    train(cfg, tmp_path / "ref")

    with monkeypatch.context() as m:
        # stop.set is read before each step and after each epoch: 3 steps + 1, then 1 step of epoch 2
        m.setattr(train_mod, "_StopFlag", stop_flag_set_at_read(6))
        assert train(cfg, tmp_path / "run")["stopped"]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step_in_epoch"] == 1
    from sparse_ad.data.dataset import FrameDataset

    loaded = []
    real_load = FrameDataset._load
    with monkeypatch.context() as m:   # the resumed epoch loads only its 2 remaining steps' frames
        m.setattr(FrameDataset, "_load", lambda self, i, ref: loaded.append(self.train) or real_load(self, i, ref))
        train(cfg, tmp_path / "run")
    assert loaded.count(True) == 4
    assert _history(tmp_path / "run") == _history(tmp_path / "ref")


def test_ddp_goes_on_when_one_rank_has_no_loadable_frame(tiny_split, tmp_path):
    """One rank's batch is a broken frame, the other's is fine: both must skip that step
    together (a rank that skipped alone left the other waiting in DDP's all-reduce). The
    broken frame is in rank 1's share of the epoch."""
    from torch.utils.data import DistributedSampler

    from sparse_ad.engine.runtime import datasets

    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", *TINY])
    train_set, _ = datasets(cfg)
    rank1 = list(DistributedSampler(train_set, num_replicas=2, rank=1, shuffle=True, seed=cfg.train.seed))
    ref = train_set.frames[next(i for i in rank1 if i % 2 == 1)]   # rank 1's to train on and to count
    (ref.scenario.path / MONO / f"{MONO}_{ref.frame}.npy").write_bytes(b"\x93NUMPY broken")
    env = {**os.environ, "SPARSE_AD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(ROOT / "tools/train.py"), "--config",
                        str(ROOT / "configs/demo.yaml"), "--run-dir", str(run), f"data.root={tiny_split}",
                        "train.epochs=1", *TINY, "train.batch_size=1", "data.max_skip_fraction=0.5"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # rank 1 alone reads it, when counting classes (its share: every 2nd frame) and in training;
    # rank 0 reports both (it reported only its own skips, i.e. none)
    assert re.search(r"^2 of \d+ frame loads skipped", r.stdout, re.M), r.stdout
    assert [(h["epoch"], h["skipped_frames"]) for h in _history(run)] == [(1, 1)]   # rank 1's, in rank 0's file


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_ddp_rank_ends_before_the_interpreters_shutdown(world):
    """`end_rank` (how `sparse-ad train` ends): under DDP the process ends at once with its
    code and its output flushed, skipping the shutdown where torch's leftover gloo threads
    can abort it; in one process it only returns the code."""
    code = ("import atexit, sys; from sparse_ad.engine.runtime import end_rank; "
            "atexit.register(lambda: print('shutdown')); print('out', end=''); print('err', end='', file=sys.stderr); "
            "sys.exit(end_rank(3) + 1)")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "WORLD_SIZE": world}, capture_output=True,
                       text=True, timeout=120)
    if world == "2":
        assert (r.returncode, r.stdout, r.stderr) == (3, "out", "err")
    else:
        assert (r.returncode, r.stdout) == (4, "outshutdown\n")
