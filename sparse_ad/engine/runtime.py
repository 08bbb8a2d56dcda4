"""Everything a run needs that is not the model: device, seeds, DDP, data, logging.

One code path for one process and for `torchrun`: the process group is set up only when
`WORLD_SIZE` > 1 (gloo on CPU, NCCL on CUDA); every rank validates a share of the frames, rank 0
pools them, logs and writes files.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparse_ad.config import Config
from sparse_ad.data.dataset import FrameDataset, train_val_frames
from sparse_ad.errors import ConfigError, SparseADError
from sparse_ad.grid import VoxelGrid
from sparse_ad.io import atomic_write_text


@dataclass
class Runtime:
    device: torch.device
    grid: VoxelGrid
    amp: bool
    rank: int
    world_size: int
    train_set: FrameDataset
    val_set: FrameDataset
    cfg: Config | None = None
    sampler: object = None
    skipped_total: int = 0
    frames_seen: int = 0
    max_skip_fraction: float = 0.05
    skip_base: list = field(default_factory=lambda: [0, 0])   # skipped / tried before a resume (rank 0)
    _skipped_examples: list = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def note_batch(self, batch) -> None:
        """Count a batch's frames and those that failed to load (warn for the first 5)."""
        self.frames_seen += len(batch) + len(batch.skipped)
        self.skipped_total += len(batch.skipped)
        for m in batch.skipped:
            if len(self._skipped_examples) < 5 and m not in self._skipped_examples:
                self._skipped_examples.append(m)
                warnings.warn(f"skipping frame: {m}", stacklevel=2)

    def check_skipped(self) -> int:
        """Report skipped frames (returns their number); fail when more than
        data.max_skip_fraction were skipped.
        Under DDP the counts are summed over the ranks first (every rank calls this at the same
        point), so rank 0 reports frames another rank skipped and all ranks fail together: a
        rank failing alone would leave the others waiting in their next collective."""
        skipped, seen = self.skip_totals()
        if not skipped:
            return 0
        share = skipped / max(seen, 1)
        earlier = self.skip_base[0] > 0   # counted by a run this one resumes
        if self.is_main:
            first = (f"; first: {self._skipped_examples[0]}" if self._skipped_examples
                     else " (by an earlier run into this folder; its log names the files)" if earlier
                     else " (on other processes; their warnings name the files)")
            print(f"{skipped} of {seen} frame loads skipped ({share:.1%}){first}")
        if share > self.max_skip_fraction:
            fix = ("fix or remove the broken files, then train into a new --run-dir (this one keeps their count)"
                   if earlier else "fix or remove the broken files listed above")
            raise SparseADError(f"{share:.1%} of frame loads failed, more than data.max_skip_fraction="
                                f"{self.max_skip_fraction}; {fix}")
        return skipped

    def skip_totals(self) -> list[int]:
        """[skipped, tried] frame loads over all ranks and the runs a resume continues (a
        collective under DDP: every rank calls it at the same point)."""
        return self.sum_over_ranks([self.skipped_total + self.skip_base[0], self.frames_seen + self.skip_base[1]])

    def sum_over_ranks(self, values: list[int]) -> list[int]:
        """Whole numbers summed over the ranks (one small all-reduce under DDP)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t)
        return [int(v) for v in t.tolist()]

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag: whether it is set on any rank (one small all-reduce under DDP), for the
        decisions that every rank must take together."""
        if not self.distributed:
            return flags
        t = torch.tensor([int(f) for f in flags], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def broadcast(self, obj):
        """Rank 0's object on every rank (e.g. the validation metrics it pooled)."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def tensorboard(self, run_dir: Path):
        if not self.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)",
                          stacklevel=2)
            return None
        return SummaryWriter(str(run_dir / "tb"))

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def end_rank(code: int) -> int:
    """Under DDP (WORLD_SIZE > 1), end this training process now with `code`: output flushed,
    then `os._exit`, so the interpreter's shutdown never runs. Otherwise return `code`.

    Why: once a model was wrapped in DistributedDataParallel, torch (2.13) keeps the gloo
    process group alive after `destroy_process_group`, and with it its worker threads. A worker
    drops each finished collective's tensors at the end of its loop, a moment after the caller
    saw the result; a tensor that Python has seen needs the GIL to be let go. Should that moment
    fall into the interpreter's shutdown, the thread cannot take the GIL and the process dies
    with SIGABRT ("terminate called without an active exception") after the run had finished
    and saved everything, and torchrun reports the rank as failed. Seen in about 1 in 6 runs of
    a 2-rank test on a loaded 2-core machine (core dump: `ProcessGroupGloo::runLoop` freeing an
    `AsyncAllreduceWork` during `Py_FinalizeEx`). Every file the run writes is closed by then."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return code
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def pick_device(name: str, local_rank: int = 0, setting: str = "train.device") -> torch.device:
    """The device `name` (auto, cpu, cuda) names; `setting`: how the user chose it (a config
    key or a command-line flag), for the error."""
    eq = " " if setting.startswith("--") else "="
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{setting}{eq}cuda but no CUDA device is visible; use {setting}{eq}cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"{setting} must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def data_root(cfg: Config) -> Path:
    """Where the split lies: `data.root`, or the synthetic split's folder in the cache (named
    by what makes it), written or not."""
    if cfg.data.root:
        return Path(cfg.data.root).expanduser()
    cache = Path(os.environ.get("SPARSE_AD_CACHE", Path.home() / ".cache" / "sparse_ad"))
    d = cfg.data
    shares = f"a{d.synth_anomaly_share:g}" + (f"_b{d.synth_braking_share:g}" if d.synth_braking_share else "")
    return cache / f"synth_s{d.synth_scenarios}_f{d.synth_frames}_{shares}_seed{d.synth_seed}"


def resolve_data_root(cfg: Config) -> Path:
    """`data.root`, or the synthetic demo split (written on first use into the cache)."""
    root = data_root(cfg)
    if cfg.data.root:
        return root
    from sparse_ad.synth import write_split

    cache, d = root.parent, cfg.data
    done = root / ".complete"
    if done.exists():
        return root
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / f"{root.name}.lock", "w")   # noqa: SIM115 - held across the write below
    except OSError as e:
        raise SparseADError(f"{cache}: cannot write the synthetic split's cache there ({e.strerror or e}); set "
                            "SPARSE_AD_CACHE to a writable folder, or data.root to a split") from None
    with lock:   # another process writing the same split (two studies side by side): wait for it
        _lock_exclusively(lock)
        if not done.exists():
            print(f"no data.root configured: writing a synthetic AnoVox-layout split to {root}")
            shutil.rmtree(root, ignore_errors=True)   # what an interrupted write left: ours, unfinished
            write_split(root, scenarios=d.synth_scenarios, frames=d.synth_frames, seed=d.synth_seed,
                        anomaly_share=d.synth_anomaly_share, braking_share=d.synth_braking_share)
            atomic_write_text(done, "ok\n")
    return root


def _lock_exclusively(f) -> None:
    """An exclusive lock on an open file, held until it is closed; where the platform or the
    filesystem has none (Windows, some network mounts), runs unlocked with a warning."""
    try:
        import fcntl

        fcntl.flock(f, fcntl.LOCK_EX)
    except (ImportError, OSError) as e:
        warnings.warn(f"{f.name}: cannot lock it ({e}); do not start two runs that write this synthetic split "
                      "at once", stacklevel=3)


def _write_synthetic_split_once(cfg: Config, rank: int) -> None:
    """Under torchrun, rank 0 alone writes the synthetic split (every rank writing the same
    scenario folders deletes what another is writing); the others wait for it and get its
    error, if any, instead of waiting forever."""
    error = [None]
    if rank == 0:
        try:
            resolve_data_root(cfg)
        except Exception as e:   # any failure: the others must hear of it, not wait in the broadcast
            error = [str(e) if isinstance(e, SparseADError) else f"writing the synthetic split failed on rank 0 "
                     f"({type(e).__name__}: {e})"]
            torch.distributed.broadcast_object_list(error, src=0)
            raise
    torch.distributed.broadcast_object_list(error, src=0)
    if error[0]:
        raise SparseADError(error[0])


def datasets(cfg: Config) -> tuple[FrameDataset, FrameDataset]:
    from sparse_ad.data.anovox import open_split

    split = open_split(resolve_data_root(cfg), cfg.data.sensor, need_gt=True)
    train, val = train_val_frames(split.frames, cfg)
    return FrameDataset(train, cfg, train=True), FrameDataset(val, cfg, train=False)


def _check_same_split(rt: Runtime) -> None:
    """Under DDP every rank builds the train/val split itself; one that read the split
    differently (a file unreadable for a moment makes a scenario look normal-only) would run a
    different number of steps and leave the others in a collective. Compared by a hash of
    the frame names, against rank 0's."""
    if not rt.distributed:
        return
    import hashlib

    names = [f.name for f in rt.train_set.frames] + ["|"] + [f.name for f in rt.val_set.frames]
    mine = hashlib.sha256("\n".join(names).encode()).hexdigest()
    if rt.any_rank(rt.broadcast(mine) != mine)[0]:
        raise SparseADError("the processes built different train/validation splits from "
                            f"{rt.cfg.data.root or 'the synthetic split'}; check that every process reads the "
                            "same files (a network file system still syncing?), then start again")


def _own_process_group(_worker_id: int) -> None:
    os.setpgid(0, 0)


def loader_worker_init():
    """A DataLoader's `worker_init_fn` for a training process: under torchrun its workers leave
    the rank's process group. torchrun passes a stop signal on to a rank's whole group, and torch
    takes a SIGTERM to a worker that its parent did not send for a crash, so the rank died before
    it could save last.pt (with data.num_workers > 0)."""
    return _own_process_group if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def refuse_ddp(command: str) -> None:
    """`command` trains and then evaluates in one process; under torchrun every rank would run
    the evaluation and write the same files (only `train` is a DDP program)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"sparse-ad {command} runs in one process, not under torchrun; train with torchrun "
                          "tools/train.py, then run sparse-ad eval on its best.pt")


def setup_runtime(cfg: Config, run_dir: Path) -> Runtime:
    from sparse_ad.models.tta import check_views

    check_views(cfg.model.test_views, cfg.grid.shape)  # before any data work: a config error
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.train.device, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    if device.type == "cpu" and cfg.train.cpu_threads > 0:
        # spconv's CPU kernels are many small GEMMs: extra threads mostly add contention
        torch.set_num_threads(cfg.train.cpu_threads)
    fresh = not Path(run_dir).exists()
    try:   # rank 0 alone writes there; another rank making it could remake it after a refusal below
        if rank == 0:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SparseADError(f"{run_dir}: cannot create the run directory ({e.strerror or e}); pick a writable "
                            "--run-dir") from None
    try:
        if world > 1 and not cfg.data.root:
            _write_synthetic_split_once(cfg, rank)
        train_set, val_set = datasets(cfg)
        rt = Runtime(device=device, grid=cfg.grid.build(), amp=cfg.train.amp and device.type == "cuda",
                     rank=rank, world_size=world, train_set=train_set, val_set=val_set, cfg=cfg,
                     max_skip_fraction=cfg.data.max_skip_fraction)
        _check_same_split(rt)
    except Exception:
        if fresh and rank == 0 and not any(Path(run_dir).iterdir()):   # made for nothing: leave no empty folder
            Path(run_dir).rmdir()
        raise
    if rt.is_main:
        print(f"device {device} | {len(train_set)} train / {len(val_set)} val frames"
              + (f" | {world} processes" if world > 1 else ""))
    return rt


def make_loader(dataset: FrameDataset, cfg: Config, rt: Runtime, shuffle: bool):
    """DataLoader with a per-epoch seeded order (DistributedSampler under DDP)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from sparse_ad.data.batch import collate

    sampler = None
    if shuffle and rt.distributed:
        sampler = _Resumable(DistributedSampler(dataset, num_replicas=rt.world_size, rank=rt.rank, shuffle=True,
                                                seed=cfg.train.seed, drop_last=False))
        rt.sampler = sampler
    elif shuffle:
        sampler = _Resumable(_EpochSeededSampler(dataset, cfg.train.seed))
        rt.sampler = sampler
    workers = cfg.data.num_workers
    return DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, shuffle=False,
                      num_workers=workers, collate_fn=collate, persistent_workers=False,
                      worker_init_fn=loader_worker_init(),
                      pin_memory=rt.device.type == "cuda",
                      multiprocessing_context="fork" if workers and os.name == "posix" else None)


class _Resumable(torch.utils.data.Sampler):
    """A sampler whose next pass can start part-way (`skip_next`): a run resumed mid-epoch
    loads only the frames it has not trained on yet, in the order the stopped run had them
    (batches are consecutive runs of the order, so skipping steps x batch size indices lines
    the rest up). Its length stays the full epoch's: the schedule counts those steps."""

    def __init__(self, inner):
        self.inner, self.skip = inner, 0

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def skip_next(self, indices: int) -> None:
        self.skip = indices

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.inner), skip, None)

    def __len__(self) -> int:
        return len(self.inner)


class _EpochSeededSampler(torch.utils.data.Sampler):
    """A random order that depends only on (seed, epoch): resumed runs see the same order."""

    def __init__(self, dataset, seed: int):
        self.n = len(dataset)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n
