"""Training: a small loop in a few phases (setup, resume, epochs of steps, validate, save).

- Data: scenario-level train/val split; augmentation seeded per (seed, epoch, frame);
  voxelization inside the step on the step's device.
- Loss: class-balanced focal loss by default, with class counts taken once over the
  training split's target voxels (cached in the run folder).
- Checkpoints: `last.pt` every epoch and on SIGINT/SIGTERM, `best.pt` by validation AUPR
  (anomalies-only, or normality-included with `train.select_on`), both written atomically
  and loaded with `weights_only=True`; the resolved config is saved beside them. Running
  the same command again resumes.
- Validation reports AUROC, AUPR, FPR95, recall, detections and positive rate at a
  threshold calibrated on validation; a collapse alarm fires when anomalies exist in
  validation but the scores rank them no better than chance (`validate.collapse_reason`).
- DDP through torchrun (gloo on CPU, NCCL on GPU), same code path.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparse_ad.config import Config, config_to_dict, save_config
from sparse_ad.data.in_flight import naming_dead_workers
from sparse_ad.engine import checkpoint as ckpt
from sparse_ad.engine.runtime import Runtime, make_loader, setup_runtime
from sparse_ad.engine.validate import validate
from sparse_ad.errors import ConfigError, SparseADError
from sparse_ad.io import atomic_write_text


@dataclass
class StepStats:
    """One epoch's training steps as this process saw them; `over_ranks` sums them for the
    history (skipped_steps are the same on every rank: a step is skipped by all or none)."""

    loss: float = 0.0
    steps: int = 0
    skipped_steps: int = 0     # not trained on: non-finite loss or gradients (AMP), or no voxel in the batch
    skipped_frames: int = 0    # frames that failed to load
    parts: dict[str, float] = field(default_factory=dict)   # summed loss terms, when there are several

    def over_ranks(self, rt) -> StepStats:
        """The sums over all ranks (one object all-gather under DDP; the loss terms' names may
        differ on a rank that trained no step)."""
        if not rt.distributed:
            return self
        every = [None] * rt.world_size
        torch.distributed.all_gather_object(every, (self.loss, self.steps, self.skipped_frames, self.parts))
        parts: dict[str, float] = {}
        for _, _, _, p in every:
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + v
        return StepStats(loss=sum(e[0] for e in every), steps=sum(e[1] for e in every),
                         skipped_steps=self.skipped_steps, skipped_frames=sum(e[2] for e in every), parts=parts)

    def add(self, loss: float, parts: dict[str, float]) -> None:
        self.loss += loss
        self.steps += 1
        if len(parts) > 2:     # voxel + scene (+ total): worth telling apart
            for k, v in parts.items():
                if k != "total":
                    self.parts[k] = self.parts.get(k, 0.0) + v


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves, and exits cleanly. A second
    signal gives up at once, except under DDP (`escalate=False`): there torchrun passes on the
    signal a scheduler sent to the whole job, and stops every rank when one exits, so a rank gets
    two signals for one stop; torchrun's own timeout (then SIGKILL) is the way to force it."""

    def __init__(self, escalate: bool = True):
        self.set = False
        self.signum = None   # stays None when another rank was signalled (DDP)
        self.escalate = escalate
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:  # second signal: give up at once
            if self.escalate:
                raise KeyboardInterrupt
            return
        self.set, self.signum = True, signum
        print(f"\nsignal {signum}: finishing the current step, then saving last.pt", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


SELECT_ON = ("anomalies_only", "normality_included")
"""Validation sections whose AUPR can pick best.pt. Anomalies-only is the benchmark's headline;
normality-included also counts false alarms in frames without anomalies, which is where a
model that cannot tell a braking vehicle from a cruising one pays (README, temporal anomalies)."""


def selection_score(metrics: dict, section: str) -> float:
    """The validation AUPR of `section`, or -1 when undefined (no anomaly voxels)."""
    aupr = metrics[section].get("aupr")
    return aupr if aupr is not None and not math.isnan(aupr) else -1.0


@naming_dead_workers()
def train(cfg: Config, run_dir: Path) -> dict:
    """Train (or resume) into `run_dir`; returns the final summary dict."""
    if cfg.train.select_on not in SELECT_ON:
        raise ConfigError(f"train.select_on: expected one of {', '.join(SELECT_ON)}, found {cfg.train.select_on!r}")
    run_dir = Path(run_dir)
    rt = setup_runtime(cfg, run_dir)
    try:
        return _train(cfg, run_dir, rt)
    finally:
        rt.close()


def _train(cfg: Config, run_dir: Path, rt: Runtime) -> dict:
    state = ckpt.resume_or_init(cfg, run_dir, rt)
    if rt.is_main:
        save_config(cfg, run_dir / "config.yaml")
    loader = make_loader(rt.train_set, cfg, rt, shuffle=True)
    if state.epoch < cfg.train.epochs:   # a finished run may be rerun (it only reports) on any layout
        ckpt.check_layout(state, {"processes": rt.world_size, "steps_per_epoch": len(loader)}, run_dir / "last.pt")
    total_steps = max(cfg.train.epochs * len(loader), 1)
    sched = ckpt.build_scheduler(cfg, state.optimizer, total_steps, state.scheduler_state)
    writer = rt.tensorboard(run_dir)
    start = time.monotonic() - 60 * state.minutes   # the budget counts the minutes before a resume too

    def clock() -> None:   # the minutes so far, kept in the state that checkpoints save
        state.minutes = (time.monotonic() - start) / 60

    with _StopFlag(escalate=not rt.distributed) as stop:
        for epoch in range(state.epoch, cfg.train.epochs):
            clock()
            # an epoch a stop interrupted is finished first (it began within the budget); the
            # step counts are the same on every rank
            over = bool(cfg.train.max_minutes) and state.minutes > cfg.train.max_minutes and not state.step_in_epoch
            if rt.any_rank(over)[0]:   # every rank's clock: they must stop before the same epoch
                _log(rt, f"time budget of {cfg.train.max_minutes} min reached after epoch {epoch}")
                break
            rt.train_set.set_epoch(epoch)
            if rt.sampler is not None:
                rt.sampler.set_epoch(epoch)
            stats, stopped = _train_epoch(cfg, rt, state, sched, loader, epoch, stop, writer)
            clock()
            if stopped:   # the resumed epoch adds to these stats (on rank 0: they are all ranks')
                state.epoch_stats, state.skips = asdict(stats.over_ranks(rt)), rt.skip_totals()
                ckpt.save(run_dir / "last.pt", state, sched, epoch=epoch, step_in_epoch=state.step_in_epoch,
                          rt=rt)
                rt.any_rank(False)   # every rank waits for the save: torchrun stops the rest when one exits
                _log(rt, f"stopped in epoch {epoch + 1} at step {state.step_in_epoch}; last.pt saved — run the "
                         "same command again to resume")
                return {"stopped": True, "epoch": epoch, "signal": stop.signum or signal.SIGTERM}
            state.step_in_epoch, state.epoch_stats = 0, {}
            # every rank scores a share with the bare module (not through DDP: its forward would
            # start gradient-sync collectives); rank 0 gets the metrics and shares them
            metrics = rt.broadcast(validate(cfg, rt, state.eval_model, epoch))
            clock()
            _record_epoch(cfg, rt, run_dir, state, sched, epoch, stats, metrics, writer)
    return _finish(cfg, rt, run_dir, state)


def _train_epoch(cfg, rt, state, sched, loader, epoch, stop, writer) -> tuple[StepStats, bool]:
    """One pass over the training loader; returns its stats and whether a stop signal ended
    it early (under DDP: on any rank, so that all ranks stop after the same step)."""
    from sparse_ad.data.batch import voxelize_batch
    from sparse_ad.io import progress_bar

    state.model.train()
    resumed = state.step_in_epoch and rt.is_main   # the stopped part's stats: all ranks', kept on rank 0
    stats = StepStats(**state.epoch_stats) if resumed else StepStats()
    first = state.step_in_epoch   # resumed mid-epoch: the steps before were done before the stop
    if first and rt.sampler is not None:
        rt.sampler.skip_next(first * cfg.train.batch_size)   # so their frames are not even loaded
    bar = progress_bar(loader, rt.is_main, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="step", leave=False,
                       initial=first)
    for step, batch in enumerate(bar, start=first):
        # nothing loaded, or no point of the batch inside the grid: decided on all ranks together,
        # or those that go on wait forever in DDP's all-reduce
        vb = voxelize_batch(batch, rt.grid, rt.device) if len(batch) else None
        empty, stopping, loaded = rt.any_rank(vb is None or len(vb.features) == 0, stop.set, len(batch) > 0)
        if stopping:
            return stats, True
        _train_one(cfg, rt, state, sched, batch, vb, stats, writer, bar, skip=empty, loaded=loaded)
        state.step_in_epoch = step + 1
    return stats, rt.any_rank(stop.set)[0]   # a signal in the last step: stop before validating


def _train_one(cfg, rt, state, sched, batch, vb, stats, writer, bar, skip: bool, loaded: bool) -> None:
    """One optimization step on a loaded batch, voxelized on the device (`vb`). `loaded`: some
    rank loaded a frame of this step (a step of failed loads only is not a skipped step)."""
    stats.skipped_frames += len(batch.skipped)
    rt.note_batch(batch)
    if skip:   # nothing to learn from, here or (DDP) on another rank: all ranks skip the step
        stats.skipped_steps += int(loaded)   # loaded somewhere, but no voxel on any rank
        return
    loss, parts = _step(cfg, rt, state, vb)
    if loss is None:
        stats.skipped_steps += 1
        return
    sched.step()
    stats.add(loss, parts)
    state.global_step += 1
    if state.ema is not None:
        state.ema.update(state.bare_model, state.global_step)
    if rt.is_main and state.global_step % cfg.train.log_every == 0 and writer:
        writer.add_scalar("train/loss", loss, state.global_step)
        for k in stats.parts:
            writer.add_scalar(f"train/loss_{k}", parts[k], state.global_step)
        writer.add_scalar("train/lr", sched.get_last_lr()[0], state.global_step)
    bar.set_postfix(loss=f"{loss:.4f}")


def _step(cfg, rt, state, vb) -> tuple[float | None, dict]:
    """One optimization step. Returns (loss, parts), or (None, {}) when the step was skipped."""
    from sparse_ad.losses import Targets
    from sparse_ad.models.sparse_tensor import to_sparse_tensor

    x = to_sparse_tensor(vb.features, vb.coords, vb.batch_index, rt.grid.shape, vb.batch_size)
    targets = Targets(voxel_targets=vb.targets, valid=vb.valid, batch_index=vb.batch_index.long(),
                      frame_labels=vb.frame_labels)
    with torch.autocast(rt.device.type, enabled=rt.amp, dtype=torch.float16):
        out = state.model(x)
    loss, parts = state.loss_fn(out, targets)
    # Under AMP a non-finite loss (fp16 overflow) goes through backward like any other: its
    # gradients are non-finite on every rank after DDP's all-reduce, so all skip the step below
    # and the scaler lowers its scale. Without AMP it is a fault in the data or the lr.
    if not rt.amp and not torch.isfinite(loss):
        raise SparseADError(f"non-finite loss {loss.item()} at step {state.global_step} on frames "
                            f"{', '.join(vb.names)}; check those files for absurd values, or lower optim.lr")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.unscale_(state.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip or math.inf)
    if not torch.isfinite(norm):
        if rt.amp:
            state.scaler.update()  # the scaler skips the step and lowers its scale
            return None, {}
        raise SparseADError(f"non-finite gradients at step {state.global_step} on frames {', '.join(vb.names)}; "
                            "lower optim.lr or set optim.grad_clip")
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return float(loss.detach()), parts


def _record_epoch(cfg, rt, run_dir, state, sched, epoch, stats, metrics, writer) -> None:
    """Collapse alarm, history, TensorBoard, last.pt and best.pt for one finished epoch (every
    rank calls it: the step stats and skip counts are summed over the ranks first)."""
    stats, state.skips = stats.over_ranks(rt), rt.skip_totals()
    state.epoch = epoch + 1
    state.threshold = metrics["threshold"]
    score = selection_score(metrics, cfg.train.select_on)
    improved = score > state.best_score
    if improved:
        state.best_score, state.best_epoch = score, epoch + 1
    entry = {"epoch": epoch + 1, "train_loss": stats.loss / max(stats.steps, 1),
             "skipped_steps": stats.skipped_steps, "skipped_frames": stats.skipped_frames, **metrics}
    if stats.parts:   # the terms' scales differ by orders of magnitude (README: scene supervision)
        entry["train_loss_parts"] = {k: v / max(stats.steps, 1) for k, v in stats.parts.items()}
    state.history.append(entry)
    if not rt.is_main:
        return
    alarm = metrics.get("collapse")
    na, ai, ob = metrics["normality_included"], metrics["anomalies_only"], metrics.get("objects", {})
    terms = "".join(f", {k} {v:.4f}" for k, v in entry.get("train_loss_parts", {}).items())
    _log(rt, f"epoch {epoch + 1}: loss {entry['train_loss']:.4f}" + (f" ({terms[2:]})" if terms else "")
         + f" | anomalies-only AUROC {_f(ai.get('auroc'))} "
             f"AUPR {_f(ai.get('aupr'))} FPR95 {_f(ai.get('fpr95'))} | recall {_f(na.get('recall'))} "
             f"detections {na.get('detections')} positive rate {_f(na.get('positive_rate'), 5)}"
             + (f" | objects detected {ob['detected']}/{ob['objects']}" if ob.get("objects") else "")
             + (" | best" if improved else ""))
    if alarm:
        _log(rt, f"COLLAPSE ALARM: {alarm}")
    if not na.get("anomaly_voxels") and epoch == state.history[0]["epoch"] - 1:
        _log(rt, "warning: no anomaly voxels in validation: the metrics above are normality-only; raise "
                 "data.val_fraction or add anomaly scenarios")
    if writer:
        for section in ("normality_included", "anomalies_only"):
            for k, v in metrics[section].items():
                if isinstance(v, (int, float)) and v is not None and not (isinstance(v, float) and math.isnan(v)):
                    writer.add_scalar(f"val_{section}/{k}", v, epoch + 1)
        if ob.get("objects"):
            writer.add_scalar("val_objects/detected_fraction", ob["detected"] / ob["objects"], epoch + 1)
        writer.add_scalar("train/epoch_loss", entry["train_loss"], epoch + 1)
        for k, v in entry.get("train_loss_parts", {}).items():
            writer.add_scalar(f"train/epoch_loss_{k}", v, epoch + 1)
        writer.add_scalar("val/collapse", 1.0 if alarm else 0.0, epoch + 1)
        writer.flush()
    # last.pt last: it is what a rerun resumes from, so everything it claims (the epoch in the
    # history, best.pt of its best epoch) must be on disk before it is
    atomic_write_text(run_dir / "history.json", json.dumps(state.history, indent=2))
    if improved:
        ckpt.save(run_dir / "best.pt", state, sched, epoch=epoch + 1, step_in_epoch=0, rt=rt)
    ckpt.save(run_dir / "last.pt", state, sched, epoch=epoch + 1, step_in_epoch=0, rt=rt)


def _finish(cfg, rt, run_dir, state) -> dict:
    skipped = rt.check_skipped()
    if not rt.is_main:
        return {}
    best = next((h for h in state.history if h["epoch"] == state.best_epoch), state.history[-1] if state.history
                else None)
    summary = {"best_epoch": state.best_epoch, "epochs": state.epoch, "best": best,
               "skipped_frames": skipped, "run_dir": str(run_dir),
               "files": {"last": str(run_dir / "last.pt"), "best": str(run_dir / "best.pt"),
                         "config": str(run_dir / "config.yaml"), "history": str(run_dir / "history.json"),
                         "tensorboard": str(run_dir / "tb")},
               "config": config_to_dict(cfg)}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    if best:
        ai = best["anomalies_only"]
        _log(rt, f"done: best epoch {state.best_epoch} — anomalies-only AUROC {_f(ai.get('auroc'))}, "
                 f"AUPR {_f(ai.get('aupr'))}, FPR95 {_f(ai.get('fpr95'))}, recall {_f(ai.get('recall'))}; "
                 f"files in {run_dir} (best.pt, last.pt, config.yaml, history.json, tb/)")
    return summary


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def _f(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _log(rt: Runtime, msg: str) -> None:
    if rt.is_main:
        print(msg, flush=True)
