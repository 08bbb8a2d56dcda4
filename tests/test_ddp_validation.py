"""Validation under DDP: every rank scores a share of the frames, rank 0 pools them. The
metrics must be those of one process scoring every frame — even when the ranks' BN
statistics have drifted apart (each rank's forward updates its own after DDP's broadcast)."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from sparse_ad.engine.runtime import end_rank

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.num_workers=0", "model.channels=[8,16]", "model.blocks_per_level=1", "train.batch_size=2",
        "data.val_fraction=0.5"]


def _validate(split: Path, run_dir: Path, drift: bool = False) -> dict | None:
    from sparse_ad.config import load_config
    from sparse_ad.engine.runtime import setup_runtime
    from sparse_ad.engine.validate import validate
    from sparse_ad.models.spunet import build_model

    cfg = load_config(str(ROOT / "configs/demo.yaml"), [f"data.root={split}", *TINY])
    rt = setup_runtime(cfg, run_dir)
    model = build_model(cfg.model)        # seeded by setup_runtime: the same weights on every rank
    if drift:                             # this rank's BN statistics are its own
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.add_(torch.randn(m.num_features))
    try:
        return validate(cfg, rt, model, epoch=0)
    finally:
        rt.close()


def _rank(rank: int, world: int, port: int, split: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), SPARSE_AD_NO_PROGRESS="1")
    torch.set_num_threads(1)
    metrics = _validate(Path(split), Path(out) / f"rank{rank}", drift=rank > 0)
    if rank == 0:
        (Path(out) / "metrics.json").write_text(json.dumps(metrics))
    else:
        assert metrics is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_validation_equals_one_process(tiny_split, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    torch.multiprocessing.spawn(_rank, args=(2, _free_port(), str(tiny_split), str(tmp_path)), nprocs=2)
    sharded = json.loads((tmp_path / "metrics.json").read_text())
    single = json.loads(json.dumps(_validate(tiny_split, tmp_path / "single")))
    assert single["frames"] == sharded["frames"] == 6 and single["anomaly_frames"] > 0
    for section in ("normality_included", "anomalies_only"):
        for key in ("auroc", "aupr", "fpr95", "recall", "voxels", "anomaly_voxels"):
            assert sharded[section][key] == pytest.approx(single[section][key], rel=1e-6, abs=1e-9), (section, key)
    assert sharded["objects"] == single["objects"]


def _skip_rank(rank: int, world: int, port: int, out: str, max_skip: float) -> None:
    """Rank 1 alone skipped a frame load; every rank reports and decides on the total."""
    import contextlib
    import io

    from sparse_ad.engine.runtime import Runtime
    from sparse_ad.errors import SparseADError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    rt = Runtime(device=torch.device("cpu"), grid=None, amp=False, rank=rank, world_size=world, train_set=None,
                 val_set=None, max_skip_fraction=max_skip)
    rt.frames_seen, rt.skipped_total = 3, int(rank == 1)
    printed, verdict, skipped = io.StringIO(), "ok", None
    try:
        with contextlib.redirect_stdout(printed):
            skipped = rt.check_skipped()
    except SparseADError:
        verdict = "failed"
    finally:
        torch.distributed.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"printed": printed.getvalue(), "verdict": verdict,
                                                            "skipped": skipped}))


@pytest.mark.parametrize("max_skip", [0.5, 0.1])
def test_skipped_frames_are_counted_over_all_ranks(tmp_path, max_skip):
    """Rank 0 reports the frame rank 1 skipped (it reported only its own), and a share over
    data.max_skip_fraction fails every rank together (rank 1 used to fail alone, leaving
    rank 0 waiting in its next collective)."""
    torch.multiprocessing.spawn(_skip_rank, args=(2, _free_port(), str(tmp_path), max_skip), nprocs=2)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert "1 of 6 frame loads skipped" in r[0]["printed"] and r[1]["printed"] == ""
    assert [x["verdict"] for x in r] == (["ok", "ok"] if max_skip == 0.5 else ["failed", "failed"])
    assert [x["skipped"] for x in r] == ([1, 1] if max_skip == 0.5 else [None, None])


def _count_rank(rank: int, world: int, port: int, out: str, fail_on: int) -> None:
    """class_counts with a stand-in per-rank count: rank r counts [5 + r, r]."""
    from types import SimpleNamespace

    from sparse_ad.config import load_config
    from sparse_ad.engine import checkpoint as ckpt
    from sparse_ad.engine.runtime import Runtime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    frames = [SimpleNamespace(name=f"f{i}") for i in range(5)]
    rt = Runtime(device=torch.device("cpu"), grid=None, amp=False, rank=rank, world_size=world,
                 train_set=SimpleNamespace(frames=frames), val_set=None)
    seen = []

    def count(cfg, rt, share):
        seen.append([f.name for f in share])
        if rank == fail_on:
            raise OSError("disk gone")
        return [5 + rank, rank]

    ckpt._count_targets = count
    result = {}
    try:
        result["counts"] = ckpt.class_counts(load_config(None, []), rt, Path(out))
        result["again"] = ckpt.class_counts(load_config(None, []), rt, Path(out))   # from the cache
    except Exception as e:   # noqa: BLE001
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        torch.distributed.destroy_process_group()
    result["shares"] = seen
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.parametrize("fail_on", [-1, 1])
def test_class_counts_are_shared_out_summed_and_fail_together(tmp_path, fail_on):
    """Each rank counts every 2nd frame and all get the sum (rank 0 alone counting kept the
    others in a collective for the whole pass); the cache is read on the second call; a rank
    that fails makes the other fail too, with a pointer to the error."""
    torch.multiprocessing.spawn(_count_rank, args=(2, _free_port(), str(tmp_path), fail_on), nprocs=2)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["shares"] for x in r] == [[["f0", "f2", "f4"]], [["f1", "f3"]]]   # once each: the 2nd call is cached
    if fail_on < 0:
        assert r[0]["counts"] == r[1]["counts"] == r[0]["again"] == r[1]["again"] == [11, 1]
        assert len(list(tmp_path.glob("class_counts_*.json"))) == 1
    else:
        assert r[1]["error"] == "OSError: disk gone"
        assert r[0]["error"].startswith("SparseADError: counting the training split's classes failed in another")
        assert not list(tmp_path.glob("class_counts_*.json"))


def _split_rank(rank: int, world: int, port: int, out: str, differ: bool) -> None:
    from types import SimpleNamespace

    from sparse_ad.engine.runtime import Runtime, _check_same_split

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    names = ["a", "b", "c"] if not (differ and rank == 1) else ["a", "c"]   # rank 1 lost a scenario
    frames = SimpleNamespace(frames=[SimpleNamespace(name=n) for n in names])
    rt = Runtime(device=torch.device("cpu"), grid=None, amp=False, rank=rank, world_size=world, train_set=frames,
                 val_set=SimpleNamespace(frames=[]), cfg=SimpleNamespace(data=SimpleNamespace(root="/split")))
    try:
        _check_same_split(rt)
        verdict = "ok"
    except Exception as e:   # noqa: BLE001
        verdict = f"{type(e).__name__}: {e}"
    finally:
        torch.distributed.destroy_process_group()
    (Path(out) / f"rank{rank}.txt").write_text(verdict)


@pytest.mark.parametrize("differ", [False, True])
def test_ranks_with_different_splits_all_stop(tmp_path, differ):
    torch.multiprocessing.spawn(_split_rank, args=(2, _free_port(), str(tmp_path), differ), nprocs=2)
    verdicts = [(tmp_path / f"rank{i}.txt").read_text() for i in range(2)]
    if differ:
        assert all(v.startswith("SparseADError: the processes built different train/validation splits from "
                                "/split") for v in verdicts)
    else:
        assert verdicts == ["ok", "ok"]


def _train_rank(rank: int, world: int, port: int, split: str, run: str, stop_at: int) -> None:
    """train() on one of 2 gloo ranks; with stop_at, rank 1 reads a stop signal from its
    stop_at-th look at the flag on (the other rank hears of it through the per-step all-reduce)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), SPARSE_AD_NO_PROGRESS="1")
    torch.set_num_threads(1)
    from sparse_ad.config import load_config
    from sparse_ad.engine import train as train_mod

    if stop_at and rank == 1:
        from tests.conftest import stop_flag_set_at_read

        train_mod._StopFlag = stop_flag_set_at_read(stop_at)
    cfg = load_config(str(ROOT / "configs/demo.yaml"), [f"data.root={split}", *TINY, "train.batch_size=1",
                                                         "train.epochs=2", "data.max_skip_fraction=0.5"])
    summary = train_mod.train(cfg, Path(run))
    (Path(run).parent / f"{Path(run).name}.rank{rank}.json").write_text(json.dumps(summary.get("skipped_frames")))
    end_rank(0)   # as `sparse-ad train` ends a rank (see there)


def test_a_ddp_run_stopped_mid_epoch_and_resumed_records_what_an_uninterrupted_one_does(tiny_split, tmp_path):
    """The stopped part's step stats are saved summed over the ranks and restored on rank 0
    alone, and the skip totals once: neither lost nor counted twice (one broken frame)."""
    from sparse_ad.config import load_config
    from sparse_ad.engine.runtime import datasets

    cfg = load_config(str(ROOT / "configs/demo.yaml"), [f"data.root={tiny_split}", *TINY])
    ref = datasets(cfg)[0].frames[1]
    next(ref.scenario.path.glob(f"LIDAR*/*_{ref.frame}.npy")).write_bytes(b"\x93NUMPY broken")

    def run(name, stop_at=0):
        torch.multiprocessing.spawn(_train_rank, args=(2, _free_port(), str(tiny_split), str(tmp_path / name),
                                                       stop_at), nprocs=2)
        return json.loads((tmp_path / f"{name}.rank0.json").read_text())

    assert run("ref") >= 1
    assert sum(h["skipped_frames"] for h in json.loads((tmp_path / "ref" / "history.json").read_text())) >= 1
    run("run", stop_at=6)                                  # epoch 2, after its first step
    stopped = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step_in_epoch"]) == (1, 1)
    resumed = run("run")
    assert run("run") == resumed == json.loads((tmp_path / "ref.rank0.json").read_text())   # and a rerun
    keys = ("epoch", "train_loss", "skipped_steps", "skipped_frames")
    history = [json.loads((tmp_path / r / "history.json").read_text()) for r in ("ref", "run")]
    assert [[h[k] for k in keys] for h in history[0]] == [[h[k] for k in keys] for h in history[1]]
    done = [torch.load(tmp_path / r / "last.pt", weights_only=True)["skips"] for r in ("ref", "run")]
    assert done[0] == done[1]
