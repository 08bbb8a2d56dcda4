"""Training state, checkpoints and resume.

A checkpoint holds only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)` (no unpickling of arbitrary objects). It is written to a
temp file, fsynced and renamed (`sparse_ad.io.atomic_write`): a kill or a full disk during
the write leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparse_ad import __version__
from sparse_ad.config import Config, changed_settings, config_to_dict
from sparse_ad.engine.ema import WeightAverage
from sparse_ad.errors import ConfigError, SparseADError
from sparse_ad.io import atomic_write, atomic_write_text

FORMAT = 1


@dataclass
class TrainState:
    model: torch.nn.Module            # possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: object
    class_counts: list[int]
    epoch: int = 0                    # epochs finished
    step_in_epoch: int = 0            # steps done in the current epoch (mid-epoch stop)
    epoch_stats: dict = field(default_factory=dict)   # ... and their summed loss and counts
    global_step: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    threshold: float = 0.5
    history: list = field(default_factory=list)
    scheduler_state: dict | None = None
    ema: WeightAverage | None = None  # train.ema_decay > 0
    layout: dict = field(default_factory=dict)   # processes and steps per epoch (`check_layout`)
    minutes: float = 0.0              # wall time trained so far, over resumes (train.max_minutes)
    skips: list = field(default_factory=lambda: [0, 0])   # frame loads skipped / tried, all ranks, all runs

    @property
    def bare_model(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validation scores and checkpoints export: the EMA when there is one."""
        return self.ema.model if self.ema is not None else self.bare_model


def versions() -> dict:
    import numba

    out = {"sparse_ad": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
           "numba": numba.__version__, "cuda": str(torch.version.cuda)}
    try:
        import spconv

        out["spconv"] = str(getattr(spconv, "__version__", "?"))
    except ImportError:
        pass
    image = os.environ.get("SPARSE_AD_IMAGE_VERSIONS")  # pip freeze of the Docker image
    if image and Path(image).exists():
        out["image"] = Path(image).read_text()
    return out


def save(path: Path, state: TrainState, sched, epoch: int, step_in_epoch: int, rt) -> None:
    if not rt.is_main:
        return
    payload = {
        "format": FORMAT, "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": state.global_step,
        "epoch_stats": state.epoch_stats if step_in_epoch else {},
        "model": state.eval_model.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scheduler": sched.state_dict(), "scaler": state.scaler.state_dict(),
        "best_score": state.best_score, "best_epoch": state.best_epoch, "threshold": state.threshold,
        "class_counts": list(state.class_counts), "history": state.history,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "config": config_to_dict(rt.cfg), "layout": state.layout, "minutes": state.minutes, "skips": state.skips,
        "versions": versions(),
    }
    if state.ema is not None:  # "model" holds the average; resuming needs the raw weights too
        payload["train_model"] = state.bare_model.state_dict()
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(Path(path), lambda f: f.write(buf.getbuffer()))


def load(path: Path, map_location="cpu", fix: str = "pass a best.pt or last.pt that `sparse-ad train` wrote") -> dict:
    """Load a checkpoint safely; a corrupt or foreign file is reported, not trusted. `fix`:
    what the error tells the user to do (the caller knows: resume vs. score a checkpoint)."""
    path = Path(path)
    if path.is_dir():
        raise SparseADError(f"{path}: is a folder; pass the checkpoint file in it, e.g. {path / 'best.pt'}")
    if not path.exists():
        raise SparseADError(f"{path}: checkpoint not found; {fix}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated/foreign files
        raise SparseADError(f"{path}: corrupt or not a sparse_ad checkpoint ({type(e).__name__}); {fix}") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT or "model" not in ck:
        raise SparseADError(f"{path}: not a sparse_ad checkpoint (format {FORMAT}); {fix}")
    return ck


def class_counts(cfg: Config, rt, cache_dir: Path) -> list[int]:
    """[normal, anomaly] target voxels over the training split, counted once and cached.

    One pass over the unaugmented training frames through the loader workers (reading is
    the slow part: ~65-80 frames/s of 87k points per process on this project's CPU machine).
    Cached in the run directory, not beside the data: a mounted split is often read-only.
    Under DDP rank 0 reads the cache and tells the others; on a miss each rank counts every
    world_size-th frame and the counts are summed, so no rank waits in a collective for the
    whole pass (NCCL gives up after 10 minutes), and a rank that fails makes all of them fail
    (its own error there, a pointer to it elsewhere). Rank 0 writes the cache."""
    names = [r.name for r in rt.train_set.frames]
    resolved = config_to_dict(cfg)
    key = json.dumps([names, resolved["grid"], resolved["labels"], cfg.data.sensor, resolved["transform"],
                      cfg.data.sweeps])
    path = Path(cache_dir) / f"class_counts_{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    cached = rt.broadcast(_cached_counts(path) if rt.is_main else None)
    if cached is not None:
        return cached
    error, counts = None, [0, 0]
    try:
        counts = _count_targets(cfg, rt, rt.train_set.frames[rt.rank::rt.world_size])
    except Exception as e:   # noqa: BLE001 - re-raised below, after the other ranks have heard of it
        error = e
    if rt.any_rank(error is not None)[0]:
        if error is not None:
            raise error
        raise SparseADError("counting the training split's classes failed in another process; its error "
                            "is printed above")
    counts = rt.sum_over_ranks(counts)
    if rt.is_main:
        atomic_write_text(path, json.dumps({"counts": counts, "frames": len(names)}))
    return counts


def _cached_counts(path: Path) -> list[int] | None:
    if not path.exists():
        return None
    try:
        return [int(v) for v in json.loads(path.read_text())["counts"]]
    except (ValueError, KeyError, TypeError):
        return None   # recounted


def _count_targets(cfg: Config, rt, frames) -> list[int]:
    """[normal, anomaly] target voxels of `frames`, unaugmented."""
    from torch.utils.data import DataLoader

    from sparse_ad.data.batch import collate, voxelize_batch
    from sparse_ad.data.dataset import FrameDataset
    from sparse_ad.engine.runtime import loader_worker_init

    counts = np.zeros(2, np.int64)
    for batch in DataLoader(FrameDataset(frames, cfg, train=False), batch_size=1, num_workers=cfg.data.num_workers,
                            collate_fn=collate, worker_init_fn=loader_worker_init()):
        rt.note_batch(batch)
        if len(batch) == 0:
            continue
        vb = voxelize_batch(batch, rt.grid, torch.device("cpu"))
        t = vb.targets[vb.valid]
        counts += [int((t == 0).sum()), int((t == 1).sum())]
    return counts.tolist()


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def build_scheduler(cfg: Config, optimizer, total_steps: int, state: dict | None):
    """The lr schedule; with `state` (a resumed run) it continues where the saved one stopped.

    Constructing a scheduler rewrites the optimizer's lr (and OneCycle's momentum) for step 0,
    so on resume the optimizer's own hyperparameters, already loaded from the checkpoint, are
    put back afterwards: they are what the stopped run would have used for its next step.
    """
    loaded = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if cfg.optim.schedule == "onecycle":
        # warm-up over 10% of the steps, but at least 2 steps: OneCycleLR divides by the
        # length of each phase, which must not round to zero on short runs (a one-step run
        # needs a 4-step schedule for that)
        total = max(total_steps + 1, 4)
        sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.optim.lr, total_steps=total,
                                                    pct_start=min(0.5, max(0.1, 2.0 / total)))
    elif cfg.optim.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    else:
        raise ConfigError(f"optim.schedule must be onecycle or cosine, got {cfg.optim.schedule!r}")
    if state:
        sched.load_state_dict(state)
        for group, hyper in zip(optimizer.param_groups, loaded, strict=True):
            group.update(hyper)
    return sched


def check_resumable(ck: dict, cfg: Config, path: Path) -> None:
    """Refuse to resume `ck` under a config that changes what it trains (`config.RUNTIME_KEYS`
    may change): more epochs would hand a finished one-cycle schedule steps it does not have."""
    changed = changed_settings(ck.get("config", {}), cfg)
    if changed:
        raise ConfigError(f"{path}: this run was started with {changed}; resume it with its own settings "
                          "(its config.yaml), or start a new --run-dir")


def resume_or_init(cfg: Config, run_dir: Path, rt) -> TrainState:
    """Fresh state, or the state in run_dir/last.pt when it exists (same command resumes)."""
    from sparse_ad.losses import build_loss
    from sparse_ad.models.spunet import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(rt.device)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp)
    last = Path(run_dir) / "last.pt"
    ck = (load(last, map_location=rt.device, fix="move it away to start fresh (best.pt may still be good)")
          if last.exists() else None)
    if ck is not None:
        check_resumable(ck, cfg, last)
        model.load_state_dict(ck.get("train_model", ck["model"]))
        optimizer.load_state_dict(ck["optimizer"])
        if ck["scaler"]:   # empty when saved without AMP (on CPU): a fresh scaler then
            scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"]["torch"].cpu())
        if ck["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ck["rng"]["cuda"]])
        counts = list(ck["class_counts"])
        if rt.is_main:
            print(f"resuming from {last} (epoch {ck['epoch']}, step {ck['step_in_epoch']} of the next epoch)")
    else:
        counts = class_counts(cfg, rt, run_dir)
    loss_fn = build_loss(cfg.loss, counts)
    if ck is None:
        if rt.is_main:
            print(f"class counts over the training split: {counts[0]} normal / {counts[1]} anomaly voxels "
                  f"({counts[1] / max(sum(counts), 1):.4%} anomalous){loss_fn.weight_note()}")
        if counts[1] == 0 and rt.is_main:   # once, not once per rank
            import warnings

            warnings.warn("no anomaly voxels in the training split: the model cannot learn anomalies",
                          stacklevel=2)
    ema = WeightAverage(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    if ema is not None and ck is not None:
        ema.model.load_state_dict(ck["model"])  # the average (the raw weights if EMA is new to the run)
    if rt.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    state = TrainState(model=model, optimizer=optimizer, scaler=scaler,
                       loss_fn=loss_fn, class_counts=counts, ema=ema)
    if ck is not None:
        state.epoch, state.step_in_epoch = int(ck["epoch"]), int(ck["step_in_epoch"])
        state.epoch_stats = dict(ck.get("epoch_stats", {})) if state.step_in_epoch else {}
        state.global_step = int(ck["global_step"])
        state.best_score, state.best_epoch = float(ck["best_score"]), int(ck["best_epoch"])
        state.threshold, state.history = float(ck["threshold"]), list(ck["history"])
        state.scheduler_state = ck["scheduler"]
        state.layout = dict(ck.get("layout") or {})   # absent from checkpoints of older versions
        state.minutes = float(ck.get("minutes", 0.0))
        state.skips = [int(v) for v in ck.get("skips", (0, 0))]
        if rt.is_main:   # the runs before this one count once, on one rank (`Runtime.skip_totals`)
            rt.skip_base = list(state.skips)
    return state


def check_layout(state: TrainState, layout: dict, path: Path) -> None:
    """Refuse to resume a run with another number of processes or of steps per epoch (a
    changed split under the same data.root): the schedule's length and the step to resume at
    were counted in the saved run's steps. Records `layout` for the next save."""
    if state.layout and state.layout != layout:
        have = ", ".join(f"{k} {state.layout.get(k)}" for k in layout)
        now = ", ".join(f"{k} {v}" for k, v in layout.items())
        raise ConfigError(f"{path}: this run was trained with {have}, this command has {now}; resume it with "
                          "the same torchrun --nproc_per_node and split, or start a new --run-dir")
    state.layout = dict(layout)
