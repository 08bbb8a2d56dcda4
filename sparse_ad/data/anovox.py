"""Reader for AnoVox splits on disk (real releases and our synthetic ones alike).

A split is a folder of `Scenario_<uuid>/` folders (plus `Scenario_Configuration_Files/`,
skipped). Each scenario holds one folder per sensor, named `TYPE(x, y, z)(a, b, c)_hash`,
described by `sensor_setup.json`, and the per-frame `VOXEL_GRID`, `ANOMALY` and `ACTION`
files. Frames are matched across sensors by their integer frame id; a frame is used only
when every modality we need has it (the rest are skipped, counted, and warned about once).

Nothing here decides labels: a frame is anomalous because its voxel grid holds anomaly
voxels (`data/labels.py`), never because `anomaly_is_alive` says so.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparse_ad.data.files import load_points, load_voxel_grid, read_kv_csv
from sparse_ad.errors import SparseADError
from sparse_ad.grid import SensorTransform

SCENARIO_PREFIX = "Scenario_"
SKIPPED_FOLDERS = {"Scenario_Configuration_Files"}
POINT_SENSORS = ("LIDAR", "SEMANTIC-LIDAR")
SENSOR_FOLDER = re.compile(
    r"^(?P<type>[A-Z_-]+?)\((?P<loc>[^()]*)\)\((?P<rot>[^()]*)\)_(?P<hash>-?\d+)$")


@dataclass(frozen=True)
class Sensor:
    """One sensor of a scenario: its folder, type and pose (metres, degrees)."""

    name: str                     # folder name, e.g. "LIDAR(0, 0, 1.8)(0, 0, 0)_123"
    sensor_type: str              # LIDAR, SEMANTIC-LIDAR, RGB-CAM, ...
    location: tuple[float, float, float]
    rotation: tuple[float, float, float]
    file_ending: str
    folder: Path

    def file(self, frame: int) -> Path:
        return self.folder / f"{self.name}_{frame}{self.file_ending}"

    def frames(self) -> set[int]:
        return _frames_in(self.folder, f"{self.name}_", self.file_ending)

    def transform(self, **variant) -> SensorTransform:
        """Sensor → grid transform; `variant` = TransformConfig fields (check-alignment)."""
        return SensorTransform(self.location, self.rotation, **variant)


@dataclass
class Scenario:
    id: str                        # the uuid part of Scenario_<uuid>
    path: Path
    sensors: list[Sensor]
    frames: list[int] = field(default_factory=list)   # usable frames, ascending
    # frames an earlier sweep can come from (`data.sweeps`): point files and an ACTION pose,
    # ground truth or not, so eval and predict stack the same sweeps and one missing ACTION
    # costs one frame, not the next `sweeps - 1` too
    sweep_frames: list[int] = field(default_factory=list)

    def sensors_of(self, sensor_type: str) -> list[Sensor]:
        return [s for s in self.sensors if s.sensor_type == sensor_type]

    def voxel_grid_file(self, frame: int) -> Path:
        return self.path / "VOXEL_GRID" / f"VOXEL_GRID_{frame}.npy"

    def anomaly_file(self, frame: int) -> Path:
        return self.path / "ANOMALY" / f"ANOMALY_{frame}.csv"

    def action_file(self, frame: int) -> Path:
        return self.path / "ACTION" / f"ACTION_{frame}.csv"


@dataclass(frozen=True)
class FrameRef:
    """A cheap handle on one frame; `load_frame` reads it."""

    scenario: Scenario
    frame: int

    @property
    def name(self) -> str:
        return f"{self.scenario.id}/{self.frame}"


@dataclass
class Frame:
    """One loaded frame. `points` holds, per sensor of the requested type, (sensor, (N, 4)
    float32 in that sensor's frame); `gt` is the VOXEL_GRID rows (M, 4) uint16."""

    ref: FrameRef
    points: list[tuple[Sensor, np.ndarray]]
    gt: np.ndarray | None
    anomaly: dict | None = None
    action: dict | None = None

    def grid_points(self, **variant) -> np.ndarray:
        """All sensors' points in the grid frame: (N, 4) float64 = x, y, z, 4th column."""
        out = np.empty((sum(len(p) for _, p in self.points), 4), np.float64)
        at = 0
        for s, p in self.points:
            out[at:at + len(p), :3] = s.transform(**variant).apply(p)
            out[at:at + len(p), 3] = p[:, 3]
            at += len(p)
        return out


@dataclass
class Split:
    root: Path
    scenarios: list[Scenario]
    sensor_type: str
    skipped_frames: int = 0        # frames present for some modalities but not all

    @property
    def frames(self) -> list[FrameRef]:
        return [FrameRef(sc, f) for sc in self.scenarios for f in sc.frames]


# --- discovery --------------------------------------------------------------------------

def open_split(root: str | Path, sensor_type: str | None = "LIDAR", need_gt: bool = True) -> Split:
    """Find the scenarios and usable frames of a split.

    sensor_type: the point modality to read (LIDAR or SEMANTIC-LIDAR), or None when only
        the ground truth is needed (scoring prediction files).
    need_gt: frames also need a VOXEL_GRID file (training and evaluation do).
    """
    root = Path(root)
    if sensor_type is not None and sensor_type not in POINT_SENSORS:
        raise SparseADError(f"sensor type must be one of {POINT_SENSORS}, got {sensor_type!r}")
    if not root.is_dir():
        raise SparseADError(f"{root}: split folder not found; pass the folder that holds the "
                            "Scenario_<uuid> folders (or run `sparse-ad synth` to make one)")
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(SCENARIO_PREFIX)
                         and p.name not in SKIPPED_FOLDERS)
    except OSError as e:
        raise SparseADError(f"{root}: cannot list the split ({e.strerror}); check permissions") from None
    scenarios, skipped = [], 0
    for folder in folders:
        sc = _open_scenario(folder)
        sets = []
        if sensor_type is not None:
            lidars = sc.sensors_of(sensor_type)
            if not lidars:
                warnings.warn(f"{folder}: no {sensor_type} sensor folder; scenario skipped", stacklevel=2)
                continue
            sets = [s.frames() for s in lidars]
            sc.sweep_frames = sorted(set.intersection(*sets) & _frames_in(folder / "ACTION", "ACTION_", ".csv"))
        if need_gt or not sets:
            sets.append(_frames_in(folder / "VOXEL_GRID", "VOXEL_GRID_", ".npy"))
        common = set.intersection(*sets)
        skipped += len(set.union(*sets) - common)
        sc.frames = sorted(common)
        if sc.frames:
            scenarios.append(sc)
    if not scenarios:
        wanted = " and ".join(k for k in (sensor_type, "VOXEL_GRID" if need_gt else "") if k) or "frame"
        hint = f" (pass the folder above it, {root.parent})" if root.name.startswith("Scenario_") else ""
        raise SparseADError(f"{root}: no usable frames (no Scenario_* folder with matching {wanted} files); "
                            f"check the path{hint}")
    if skipped:
        warnings.warn(f"{root}: {skipped} frame(s) lack a {sensor_type} or VOXEL_GRID file and are "
                      "skipped", stacklevel=2)
    return Split(root, scenarios, sensor_type, skipped)


def _frames_in(folder: Path, prefix: str, ending: str) -> set[int]:
    """Frame ids of `<prefix><frame><ending>` files, `<frame>` written as AnoVox writes it:
    ASCII digits, no leading zero (the readers rebuild file names from the integer). Other
    names with a frame-like middle (`_0100`, non-ASCII digits) are skipped with a warning."""
    frames, odd = set(), []
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return frames
    for name in names:
        if name.startswith(prefix) and name.endswith(ending):
            middle = name[len(prefix):len(name) - len(ending)]
            if middle.isascii() and middle.isdigit() and str(int(middle)) == middle:
                frames.add(int(middle))
            elif middle.isdigit():
                odd.append(name)
    if odd:
        warnings.warn(f"{folder}: {len(odd)} file(s) such as {sorted(odd)[0]} have a frame id with a leading zero "
                      "or non-ASCII digits and are skipped; AnoVox names frames as plain integers "
                      "(e.g. _100) — rename them", stacklevel=3)
    return frames


def _open_scenario(folder: Path) -> Scenario:
    setup = _read_sensor_setup(folder / "sensor_setup.json")
    sensors = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        m = SENSOR_FOLDER.match(sub.name)
        if not m:
            continue  # VOXEL_GRID, ANOMALY, ACTION, ...
        entry = setup.get(sub.name)
        if entry is not None:
            sensors.append(_sensor_from_setup(sub, entry, folder / "sensor_setup.json"))
        else:
            sensors.append(_sensor_from_name(sub, m))
    return Scenario(folder.name[len(SCENARIO_PREFIX):], folder, sensors)


def _read_sensor_setup(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise SparseADError(f"{path}: not valid JSON ({e}); restore it or delete it to fall back "
                            "to the sensor folder names") from None
    if not isinstance(data, dict):
        raise SparseADError(f"{path}: expected an object keyed by sensor folder name")
    return data


def _vec3(value, path: Path, what: str) -> tuple[float, float, float]:
    try:
        v = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        v = ()
    if len(v) != 3 or not all(np.isfinite(v)):
        raise SparseADError(f"{path}: sensor {what} must be 3 finite numbers, got {value!r}")
    return v


def _sensor_from_setup(folder: Path, entry: dict, path: Path) -> Sensor:
    if not isinstance(entry, dict):
        raise SparseADError(f"{path}: entry {folder.name!r} must be an object")
    named = SENSOR_FOLDER.match(folder.name)
    for key in ("sensor_type", "file_ending"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise SparseADError(f"{path}: entry {folder.name!r} has {key} {entry[key]!r}; it must be a string "
                                "(e.g. \"LIDAR\", \".npy\") — fix it or delete the key")
    stype = entry.get("sensor_type") or (named["type"] if named else None)
    if not stype:
        raise SparseADError(f"{path}: entry {folder.name!r} has no sensor_type, and the folder name does not "
                            "say it either; add it")
    ending = entry.get("file_ending") or _guess_ending(folder, stype)
    if not ending.startswith("."):
        ending = "." + ending
    pose = [_from_name(named, what, folder) if entry.get(what) is None and named else _vec3(entry.get(what), path, what)
            for what in ("location", "rotation")]   # missing from the file: the folder name says it
    return Sensor(folder.name, stype, *pose, ending, folder)


def _from_name(m: re.Match, what: str, folder: Path) -> tuple[float, float, float]:
    """The location or rotation tuple printed in a sensor folder's name."""
    return _vec3(m["loc" if what == "location" else "rot"].split(","), folder, f"{what} (from the folder name)")


def _sensor_from_name(folder: Path, m: re.Match) -> Sensor:
    return Sensor(folder.name, m["type"], _from_name(m, "location", folder), _from_name(m, "rotation", folder),
                  _guess_ending(folder, m["type"]), folder)


def _guess_ending(folder: Path, sensor_type: str) -> str:
    if sensor_type in POINT_SENSORS:
        for ending in (".npy", ".pcd"):
            if any(p.name.endswith(ending) for p in folder.iterdir()):
                return ending
        return ".npy"
    return ".png"


# --- loading ----------------------------------------------------------------------------

def load_frame(ref: FrameRef, sensor_type: str = "LIDAR", with_gt: bool = True,
               with_meta: bool = False) -> Frame:
    """Read one frame's points (every sensor of `sensor_type`), GT rows and optional csvs."""
    sc = ref.scenario
    points = [(s, load_points(s.file(ref.frame), semantic=(sensor_type == "SEMANTIC-LIDAR")))
              for s in sc.sensors_of(sensor_type)]
    gt = load_voxel_grid(sc.voxel_grid_file(ref.frame)) if with_gt else None
    anomaly = action = None
    if with_meta:
        if sc.anomaly_file(ref.frame).exists():
            anomaly = read_kv_csv(sc.anomaly_file(ref.frame))
        if sc.action_file(ref.frame).exists():
            action = read_kv_csv(sc.action_file(ref.frame))
    return Frame(ref, points, gt, anomaly, action)
