"""Typed configuration: dataclasses loaded from YAML, overridable as `key.sub=value`.

Defaults live here (grid constants via `grid.py`, tag sets via `tags.py`); YAML files in
`configs/` only say what differs. Unknown keys are rejected with the valid ones listed, and
the resolved config is saved next to every run (`save_config`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sparse_ad.errors import ConfigError
from sparse_ad.grid import ANOVOX_OFFSET, ANOVOX_RESOLUTION, ANOVOX_SHAPE, VoxelGrid
from sparse_ad.tags import DEFAULT_ANOMALY_TAGS, DEFAULT_IGNORE_TAGS


@dataclass
class GridConfig:
    resolution: float = ANOVOX_RESOLUTION
    shape: tuple[int, int, int] = ANOVOX_SHAPE
    offset: tuple[float, float, float] = ANOVOX_OFFSET

    def build(self) -> VoxelGrid:
        grid = VoxelGrid(self.resolution, tuple(self.shape), tuple(self.offset))
        if grid.resolution != ANOVOX_RESOLUTION and grid.shape == ANOVOX_SHAPE:
            # a resolution alone would shrink the box; the GT (`voxelize-gt --resolution`) keeps it
            same_box = VoxelGrid().with_resolution(grid.resolution).shape
            raise ConfigError(f"grid.resolution={grid.resolution} with AnoVox's grid.shape {list(grid.shape)} "
                              f"covers {[round(e, 3) for e in grid.extent]} m, not its 500 x 500 x 32 m box; "
                              f"set grid.shape={list(same_box)} too")
        return grid


@dataclass
class LabelConfig:
    anomaly_tags: tuple[int, ...] = DEFAULT_ANOMALY_TAGS
    ignore_tags: tuple[int, ...] = DEFAULT_IGNORE_TAGS


@dataclass
class TransformConfig:
    """Sensor → grid transform variant (see `grid.SensorTransform`); AnoVox: the defaults."""

    location_sign: float = -1.0
    negate_rotation: bool = True
    flip_y: bool = False


@dataclass
class DataConfig:
    root: str = ""                 # AnoVox split root; empty = synthetic demo split in cache
    sensor: str = "LIDAR"          # the point modality the model reads: LIDAR (SEMANTIC-LIDAR's 4th
    #                                column is the label; check-alignment and voxelize-gt read it)
    val_fraction: float = 0.25     # share of scenarios held out (scenario-level split)
    split_seed: int = 0
    max_frames: int = 0            # 0 = all frames
    num_workers: int = 2
    max_skip_fraction: float = 0.05  # more skipped (broken) frames than this fails the run
    sweeps: int = 1                # LiDAR sweeps per input: this one + sweeps-1 earlier ones registered
    #                                by the ACTION poses (data/sweeps.py); > 1 needs model.in_channels 7
    # synthetic split written when root is empty
    synth_scenarios: int = 8
    synth_frames: int = 10
    synth_seed: int = 0
    synth_anomaly_share: float = 0.6
    synth_braking_share: float = 0.0  # of the anomaly scenarios: the lead vehicle brakes (temporal, tag 100)


@dataclass
class AugmentConfig:
    enabled: bool = True
    rotate_z_deg: float = 180.0
    flip_y: bool = True
    scale: tuple[float, float] = (0.95, 1.05)
    jitter_m: float = 0.01


TEST_VIEW_COUNTS = (1, 2, 4, 8)
"""Allowed `model.test_views`: the first 1, 2, 4 or all 8 of `models.tta.VIEWS`."""

INFERENCE_ENGINES = ("spconv", "gather_gemm", "gather_gemm_graphs")
"""How a folded model runs its convs (`eval`/`predict --engine`): spconv's kernels, plain torch
gather + GEMM (`models/gather_gemm.py`), or those replayed from CUDA graphs (`models/graphs.py`,
CUDA only)."""

DEFAULT_ENGINE = {"cpu": "spconv", "cuda": "gather_gemm_graphs"}
"""The engine `eval` and `predict` use per device type when none is named. gather_gemm does ~3x
spconv's arithmetic, so it loses on a CPU (measured). On an H100 (2026-11-26, `anovox_mono`,
whole path per frame) its CUDA-graph form with torch.gather row copies took 5.2 ms, eager
gather_gemm 8.2 and spconv 13.3 in the same run (README, "Inference engines")."""


@dataclass
class ModelConfig:
    in_channels: int = 6           # intensity, log count, offset xyz, normalized height (+ sweep lag: 7)
    base_channels: int = 32
    channels: tuple[int, ...] = (32, 64, 128, 256)
    blocks_per_level: int = 2
    scene_head: bool = False
    head_prior: float = 0.01       # initial P(anomaly) of the voxel head (RetinaNet bias init)
    test_views: int = 1            # mirrored copies averaged when scoring (validation, eval, predict): models/tta.py


@dataclass
class LossConfig:
    kind: str = "focal"            # focal | bce
    supervision: str = "voxel"     # voxel | scene | mil
    gamma: float = 2.0
    beta: float = 0.999999         # class-balanced effective-number beta; its weights depend on the counts (README)
    pos_weight: float = 3.0        # only for kind=bce
    scene_weight: float = 1.0      # weight of the frame-level term (added whenever model.scene_head)


@dataclass
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 1e-2
    schedule: str = "onecycle"     # onecycle | cosine
    grad_clip: float = 10.0


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 4
    seed: int = 0
    amp: bool = True               # used on CUDA only
    device: str = "auto"           # auto | cpu | cuda
    deterministic: bool = False
    log_every: int = 20
    max_minutes: float = 0.0       # 0 = no time budget
    cpu_threads: int = 0           # torch threads on CPU; 0 = torch's default
    ema_decay: float = 0.0         # > 0: validate and export an EMA of the weights (engine/ema.py)
    select_on: str = "anomalies_only"  # validation AUPR that picks best.pt: anomalies_only | normality_included


@dataclass
class Config:
    grid: GridConfig = field(default_factory=GridConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --- loading ----------------------------------------------------------------------------

def _coerce(value, typ, where: str):
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(typ, value, where)
    if origin is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: union types are not supported in config")
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None


def _from_dict(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where or 'top level'}: unknown key(s) {', '.join(unknown)}; valid keys: "
                          f"{', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_saved(data: dict, source: str) -> Config:
    """The Config stored in a checkpoint. Keys this version no longer has (a setting removed
    since the checkpoint was written) are dropped with a warning naming them, so an older
    checkpoint still evaluates; anything else wrong in it is a ConfigError as usual."""
    dropped: list[str] = []

    def prune(cls, d: dict, prefix: str) -> dict:
        hints = typing.get_type_hints(cls)
        out = {}
        for k, v in d.items():
            if k not in hints:
                dropped.append(prefix + k)
            elif dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
                out[k] = prune(hints[k], v, f"{prefix}{k}.")
            else:
                out[k] = v
        return out

    pruned = prune(Config, data, "")
    if dropped:
        warnings.warn(f"{source}: its config has settings this version does not know ({', '.join(dropped)}); "
                      "ignored", stacklevel=2)
    return _from_dict(Config, pruned, source)


def _set_override(tree: dict, dotted: str, raw: str):
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        first = (str(e).splitlines() or [""])[0]
        raise ConfigError(f"override {dotted}={raw}: not a valid YAML value ({first}); fix its syntax (a list "
                          "is written [8,16]; quote the whole argument for the shell)") from None
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


REPO_ROOT = Path(__file__).resolve().parents[1]
"""The checkout this package runs from (its `configs/` hold the shipped recipes)."""


def _located(path: Path) -> Path:
    """`path`, or, when it is a relative path missing here, the same path in the checkout
    (`configs/demo.yaml` from any folder)."""
    if path.exists() or path.is_absolute() or not (REPO_ROOT / path).exists():
        return path
    return REPO_ROOT / path


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults ← YAML file (which may name a `base:` file to start from) ← `key=value`s."""
    tree: dict = {}
    if path:
        tree = _read_yaml(_located(Path(path)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.epochs=5)")
        key, raw = item.split("=", 1)
        _set_override(tree, key.strip(), raw.strip())
    try:
        cfg = _from_dict(Config, tree, "")
    except ConfigError as e:   # name where the settings came from (the key may sit in a `base:` file)
        raise ConfigError(f"{path or 'defaults'}{' + overrides' if overrides else ''}: {e}") from None
    check_ranges(cfg)
    return cfg


_RANGES = {   # key: the interval it must lie in, "[" / "(" ends, None unbounded; the rest are checked where used
    "train.epochs": "[1, None)", "train.batch_size": "[1, None)", "train.log_every": "[1, None)",
    "train.max_minutes": "[0, None)", "train.cpu_threads": "[0, None)", "train.ema_decay": "[0, 1)",
    "data.num_workers": "[0, None)", "data.max_frames": "[0, None)", "data.val_fraction": "(0, 1)",
    "data.max_skip_fraction": "[0, 1]", "optim.lr": "(0, None)", "optim.weight_decay": "[0, None)",
    "optim.grad_clip": "[0, None)",
    "train.seed": "[0, None)", "data.split_seed": "[0, None)", "data.synth_seed": "[0, None)",   # numpy seeds
    "loss.gamma": "[0, None)", "loss.beta": "[0, 1)", "loss.pos_weight": "(0, None)", "loss.scene_weight": "[0, None)",
    "augment.rotate_z_deg": "[0, 180]", "augment.jitter_m": "[0, None)", "augment.scale": "(0, None)",
}


def check_ranges(cfg: Config, keys=tuple(_RANGES)) -> None:
    """Numbers that torch or the DataLoader would reject with a traceback, or accept and
    misbehave on (a 0 validation share still holds one scenario out), as one-line errors.
    `keys`: only these settings (e.g. the ones `eval --batch-size/--workers` set)."""
    for key in keys:
        interval = _RANGES[key]
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        lo, hi = (None if x.strip() == "None" else float(x) for x in interval[1:-1].split(","))
        for v in value if isinstance(value, tuple) else (value,):   # a range such as augment.scale: each end
            inside = math.isfinite(v) and (v >= lo if interval[0] == "[" else v > lo) and \
                (hi is None or (v <= hi if interval[-1] == "]" else v < hi))
            if not inside:
                raise ConfigError(f"{key}: expected {'numbers' if value is not v else 'a number'} in "
                                  f"{interval.replace('None', 'inf')}, found {value}")
        if isinstance(value, tuple) and list(value) != sorted(value):
            raise ConfigError(f"{key}: expected (low, high) with low <= high, found {value}")


def _read_yaml(path: Path, depth: int = 0) -> dict:
    if depth > 8:
        raise ConfigError(f"{path}: `base:` chain is too deep (a cycle?)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; pass an existing YAML, e.g. configs/demo.yaml") from None
    except (OSError, UnicodeDecodeError) as e:   # a folder, unreadable, or not text
        raise ConfigError(f"{path}: cannot read it as a YAML config ({getattr(e, 'strerror', None) or e}); pass a "
                          "YAML file, e.g. configs/demo.yaml") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    base = data.pop("base", None)
    if base:
        data = _merge(_read_yaml((path.parent / base).resolve(), depth + 1), data)
    return data


def config_to_dict(cfg: Config) -> dict:
    """Plain dict (lists for tuples) of a config, for YAML and JSON."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


RUNTIME_KEYS = frozenset({"data.root", "data.num_workers", "data.max_skip_fraction", "train.device", "train.amp",
                          "train.deterministic", "train.log_every", "train.max_minutes", "train.cpu_threads"})
"""Settings that say where the data lies and how the machine runs a training, not what it
trains: a resumed run, or a study reusing a finished one, may change them."""


def changed_settings(saved: dict, cfg: Config, ignore=RUNTIME_KEYS) -> str:
    """'key=old (now new), ...' for the settings of a saved config (a run's config.yaml or a
    checkpoint's) that `cfg` changes, outside `ignore`; '' when none. A setting the saved
    config lacks (it predates it) counts as changed when `cfg` moves it off its default:
    the old run behaved as the default (new settings keep the old behaviour there) at best."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    old, now, default = flat(saved), flat(config_to_dict(cfg)), flat(config_to_dict(Config()))
    for k in now.keys() - old.keys():
        old[k] = default.get(k, now[k])
    keys = sorted(k for k in old.keys() & now.keys() if old[k] != now[k] and k not in ignore)
    return ", ".join(f"{k}={old[k]!r} (now {now[k]!r})" for k in keys[:4]) + (" ..." if len(keys) > 4 else "")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp file, then rename)."""
    from sparse_ad.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
