"""The synthetic AnoVox split writer: layout, dtypes, ground truth, anomalies, determinism,
csv records, poses, the stereo rig, the ray caster's geometry and the CLI."""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from sparse_ad.errors import ConfigError
from sparse_ad.grid import SensorTransform, VoxelGrid
from sparse_ad.synth import add_synth_args, run_synth, write_split
from sparse_ad.synth import raycast as rc
from sparse_ad.synth.scenario import plan_scenario, render_frame
from sparse_ad.synth.sensors import SENSOR_SETS
from sparse_ad.tags import DEFAULT_ANOMALY_TAGS
from sparse_ad.voxelize import voxelize

GRID = VoxelGrid()
POINTS = 4000          # LiDAR shots per sweep: small, for speed
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
MONO_FOLDER = re.compile(r"^(LIDAR|SEMANTIC-LIDAR)\(0, 0, 1\.8\)\(0, 0, 0\)_\d+$")
COMPACT_TAGS = (6, 9)    # poles, trees: they only line up when registered


def _write(path: Path, **kw):
    args = dict(scenarios=2, frames=3, seed=5, anomaly_share=0.5, progress=False, points_per_sweep=POINTS)
    args.update(kw)
    return write_split(path, **args)


@pytest.fixture(scope="module")
def mono(tmp_path_factory):
    root = tmp_path_factory.mktemp("mono")
    return root, _write(root)


@pytest.fixture(scope="module")
def stereo(tmp_path_factory):
    root = tmp_path_factory.mktemp("stereo")
    return root, _write(root, scenarios=1, frames=2, anomaly_share=1.0, sensor_sets="stereo", points_per_sweep=20000)


def _setup(sc: Path) -> dict:
    return json.loads((sc / "sensor_setup.json").read_text())


def _point_folders(sc: Path, sensor_type: str) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in _setup(sc).items() if v["sensor_type"] == sensor_type]


def _frames(folder: Path, prefix: str, ending: str) -> list[int]:
    out = []
    for p in folder.iterdir():
        assert p.name.startswith(prefix) and p.name.endswith(ending), p.name
        out.append(int(p.name[len(prefix):-len(ending)]))
    return sorted(out)


def _kv(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        assert re.fullmatch(r"[^;]+ ; .+", line), line
        key, value = line.split(" ; ", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _gt(sc: Path, frame: int) -> np.ndarray:
    return np.load(sc / "VOXEL_GRID" / f"VOXEL_GRID_{frame}.npy")


def _semantic_voxels(sc: Path, frame: int, **variant):
    pts, tags = [], []
    for name, entry in _point_folders(sc, "SEMANTIC-LIDAR"):
        sem = np.load(sc / name / f"{name}_{frame}.npy")
        pts.append(SensorTransform(tuple(entry["location"]), tuple(entry["rotation"]), **variant).apply(sem))
        tags.append(sem[:, 3].astype(np.int32))
    return voxelize(np.concatenate(pts), labels=np.concatenate(tags))


# --- layout -------------------------------------------------------------------------------

def test_layout_and_names(mono):
    root, summary = mono
    assert (root / "Scenario_Configuration_Files").is_dir()
    assert not (root / "Scenario_Configuration_Files" / "sensor_setup.json").exists()
    scenarios = sorted(p.name for p in root.iterdir() if p.name != "Scenario_Configuration_Files")
    assert scenarios == sorted(f"Scenario_{s}" for s in summary.scenario_ids)
    assert all(re.fullmatch(f"Scenario_{UUID}", s) for s in scenarios)
    assert len(summary.anomaly_scenarios) == 1
    for sid in summary.scenario_ids:
        sc = root / f"Scenario_{sid}"
        setup = _setup(sc)
        saved = sorted(k for k, v in setup.items() if v["save_data"])
        assert saved == sorted(p.name for p in sc.iterdir() if MONO_FOLDER.match(p.name))
        assert len(saved) == 2
        frames = summary.frame_ids[sid]
        assert len(frames) == 3 and frames == sorted(frames) and len(set(frames)) == 3
        for name in saved:
            e = setup[name]
            assert e["location"] == [0, 0, 1.8] and e["rotation"] == [0, 0, 0] and e["file_ending"] == ".npy"
            a = e["args"]
            assert (a["range"], a["channels"], a["upper_fov"], a["lower_fov"], a["noise_stddev"]) == \
                (100.0, 64, 15.0, -25.0, 0.1)
            assert isinstance(a["points_per_second"], int | float)
            assert _frames(sc / name, f"{name}_", ".npy") == frames
        for cam in (k for k, v in setup.items() if not v["save_data"]):
            assert setup[cam]["sensor_type"].endswith("CAM") and not (sc / cam).exists()
        assert _frames(sc / "VOXEL_GRID", "VOXEL_GRID_", ".npy") == frames
        assert _frames(sc / "ACTION", "ACTION_", ".csv") == frames
        if sid in summary.anomaly_scenarios:
            assert _frames(sc / "ANOMALY", "ANOMALY_", ".csv") == frames
        else:
            assert not (sc / "ANOMALY").exists()  # the generator writes none without an anomaly actor
        assert not any(p.name.startswith(".") for p in sc.rglob("*"))  # no temp files left


def test_project_reader_opens_it(mono):
    from sparse_ad.data.anovox import load_frame, open_split

    root, summary = mono
    split = open_split(root, "LIDAR")
    assert sorted(s.id for s in split.scenarios) == sorted(summary.scenario_ids)
    frame = load_frame(split.frames[0], "LIDAR", with_meta=True)
    assert frame.points[0][1].shape[1] == 4 and frame.gt.dtype == np.uint16
    assert frame.action["lidar transformation matrix"].shape == (4, 4)


def test_dtypes_shapes_and_range(mono):
    root, summary = mono
    for sid in summary.scenario_ids:
        sc = root / f"Scenario_{sid}"
        for f in summary.frame_ids[sid]:
            for stype in ("LIDAR", "SEMANTIC-LIDAR"):
                for name, _ in _point_folders(sc, stype):
                    p = np.load(sc / name / f"{name}_{f}.npy", allow_pickle=False)
                    assert p.dtype == np.float32 and p.ndim == 2 and p.shape[1] == 4 and len(p) > 0.4 * POINTS
                    assert np.linalg.norm(p[:, :3], axis=1).max() <= 100.0 + 1e-3
                    if stype == "LIDAR":
                        assert 0.0 <= p[:, 3].min() and p[:, 3].max() <= 1.0
                    else:
                        assert np.array_equal(p[:, 3], np.round(p[:, 3]))
                        # the ground is at z = -1.8 in the sensor frame, noise-free
                        road = p[p[:, 3] == 1]
                        assert np.allclose(road[:, 2], -1.8, atol=1e-4)
            gt = _gt(sc, f)
            assert gt.dtype == np.uint16 and gt.ndim == 2 and gt.shape[1] == 4
            assert (gt[:, :3] < np.array(GRID.shape)).all()


def test_voxel_grid_sorted_unique(mono):
    root, summary = mono
    for sid in summary.scenario_ids:
        for f in summary.frame_ids[sid]:
            keys = GRID.keys(_gt(root / f"Scenario_{sid}", f)[:, :3])
            assert (np.diff(keys) > 0).all()


# --- ground truth ---------------------------------------------------------------------------

def test_gt_holds_every_semantic_lidar_voxel_and_more(mono):
    root, summary = mono
    for sid in summary.scenario_ids:
        sc = root / f"Scenario_{sid}"
        for f in summary.frame_ids[sid]:
            gt = _gt(sc, f)
            keys = GRID.keys(gt[:, :3])
            vox = _semantic_voxels(sc, f)
            inside = np.isin(vox.keys, keys)
            assert inside.all()
            same = gt[np.searchsorted(keys, vox.keys), 3] == vox.labels
            assert same.mean() > 0.97          # camera points change a few labels, no more
            assert len(gt) > 1.05 * len(vox)   # the camera adds surfaces the LiDAR misses


def test_gt_is_semantic_lidar_where_no_camera_point():
    """Rebuild one frame in memory: a voxel no camera point falls in keeps exactly the
    label the semantic LiDAR alone gives it (the AnoVox rule), and the GT is the union."""
    sets = SENSOR_SETS["mono"]
    plan = plan_scenario(np.random.SeedSequence(3, spawn_key=(0,)), 0, 2, True)
    out = render_frame(plan, 1, sets, POINTS)
    t = sets[0].transform
    sem = voxelize(t.apply(out.sets[0].semantic), labels=out.sets[0].semantic[:, 3].astype(np.int32))
    cam = voxelize(t.apply(out.sets[0].camera))
    keys = GRID.keys(out.gt[:, :3])
    assert np.array_equal(keys, np.union1d(sem.keys, cam.keys))
    alone = ~np.isin(sem.keys, cam.keys)
    assert alone.sum() > 100
    pos = np.searchsorted(keys, sem.keys[alone])
    assert np.array_equal(out.gt[pos, 3], sem.labels[alone])


def test_anomalies_in_gt_of_anomaly_scenarios_only(mono):
    root, summary = mono
    for sid in summary.scenario_ids:
        sc = root / f"Scenario_{sid}"
        frames = summary.frame_ids[sid]
        per_frame = [np.isin(_gt(sc, f)[:, 3], DEFAULT_ANOMALY_TAGS).sum() for f in frames]
        if sid in summary.anomaly_scenarios:
            # hidden behind the lead van at first, then visible; alive all along
            assert per_frame[0] == 0 and all(n > 0 for n in per_frame[1:])
            tags = set()
            for f in frames:
                rec = _kv(sc / "ANOMALY" / f"ANOMALY_{f}.csv")
                assert rec["anomaly_is_alive"] is True and rec["frame_id"] == f and rec["scenario_id"] == sid
                tags |= set(rec["semantic_tags"])
                assert len(rec["size"]) == 3 and 0.05 < max(rec["size"]) <= 3.0
            gt_tags = set(np.unique(_gt(sc, frames[-1])[:, 3]).tolist()) & set(DEFAULT_ANOMALY_TAGS)
            assert gt_tags == tags
        else:
            assert sum(per_frame) == 0
            for name, _ in _point_folders(sc, "SEMANTIC-LIDAR"):
                for f in frames:
                    assert not np.isin(np.load(sc / name / f"{name}_{f}.npy")[:, 3], DEFAULT_ANOMALY_TAGS).any()
    assert summary.anomaly_voxels > 0


def test_anomaly_visible_in_most_frames_but_not_all(tmp_path):
    summary = _write(tmp_path, scenarios=3, frames=8, seed=11, anomaly_share=1.0, points_per_sweep=2000)
    for sid in summary.scenario_ids:
        assert 4 <= summary.anomaly_frames[sid] < 8


@pytest.fixture(scope="module")
def braking(tmp_path_factory):
    root = tmp_path_factory.mktemp("braking")
    return root, _write(root, scenarios=3, frames=6, seed=8, anomaly_share=1.0, braking_share=0.67,
                        points_per_sweep=8000)


def _lead_van_voxels(sc: Path, frame: int, tags) -> int:
    """Voxels with one of `tags` in the ego lane ahead (grid frame: y near 0, x 3-40 m ahead)."""
    gt = _gt(sc, frame)
    centre = (gt[:, :3].astype(np.float64) + 0.5) * GRID.resolution - np.asarray(GRID.offset)
    ahead = (centre[:, 0] > 3.0) & (centre[:, 0] < 40.0) & (np.abs(centre[:, 1]) < 2.5)
    return int((ahead & np.isin(gt[:, 3], tags)).sum())


def test_sudden_braking_scenarios(braking):
    """The lead van carries tag 100 exactly in its braking frames (from the third frame on),
    its vehicle tag before; ANOMALY records a vehicle slowing down; the static anomaly
    scenario of the split is as before."""
    root, summary = braking
    assert len(summary.braking_scenarios) == 2 and len(summary.anomaly_scenarios) == 3
    for i, sid in enumerate(summary.scenario_ids):
        sc = root / f"Scenario_{sid}"
        frames = summary.frame_ids[sid]
        plan = plan_scenario(np.random.SeedSequence(8, spawn_key=(i,)), i, 6, True,
                             "braking" if sid in summary.braking_scenarios else "static")
        assert plan.scenario_id == sid
        tagged = [_lead_van_voxels(sc, f, [100]) for f in frames]
        anomalies = [int(np.isin(_gt(sc, f)[:, 3], DEFAULT_ANOMALY_TAGS).sum()) for f in frames]
        if sid not in summary.braking_scenarios:
            assert plan.kind == "static" and sum(anomalies) > 0
            continue
        assert plan.kind == "braking" and plan.anomaly_frames.tolist()[:2] == [False, False]
        for k, f in enumerate(frames):
            if plan.anomaly_frames[k]:
                assert tagged[k] > 10 and anomalies[k] == tagged[k]     # the van, and only it
            else:
                assert anomalies[k] == 0 and _lead_van_voxels(sc, f, [14, 15]) > 10
        assert plan.anomaly_frames.sum() >= 2
        recs = [_kv(sc / "ANOMALY" / f"ANOMALY_{f}.csv") for f in frames]
        assert all(r["anomaly_is_alive"] is True and r["semantic_tags"] == [100] for r in recs)
        assert recs[0]["anomaly_type_id"].startswith("vehicle.") and max(recs[0]["size"]) > 4.0
        speed = [math.hypot(*r["velocity"][:2]) for r in recs]
        assert speed[0] > 5.0 and all(b <= a + 1e-4 for a, b in zip(speed, speed[1:], strict=False))
        assert speed[-1] < speed[0] - 1.0
        braking_accel = [math.hypot(*r["acceleration"][:2]) for r in recs]
        assert all((a > 3.0) == bool(b) for a, b in zip(braking_accel, plan.anomaly_frames, strict=True))
        # the ego brakes too, and stops short of the van
        gap = plan.anomaly_pos[:, 0] - plan.anomaly.size[0] / 2 - plan.ego_x
        assert gap.min() > 2.4 + 1.0 and plan.braking.any()
    config = json.loads((root / "Scenario_Configuration_Files" / "scenario_config_map_SynthTown.json").read_text())
    kinds = [s["anomaly_config"]["anomalytype"] for s in config["scenario_definition"]["scenarios"]]
    assert sorted(kinds) == ["STATIC", "SUDDEN_BRAKING", "SUDDEN_BRAKING"]
    assert config["synth"]["braking_share"] == 0.67


def test_braking_leaves_the_other_scenarios_alone(tmp_path, mono):
    """Which scenarios brake is drawn from a stream of its own: turning every anomaly
    scenario into a braking one leaves the normal scenarios byte for byte as they were."""
    root, summary = mono
    some = _write(tmp_path / "all", braking_share=1.0)
    assert some.anomaly_scenarios and some.braking_scenarios == some.anomaly_scenarios
    normal = [s for s in summary.scenario_ids if s not in summary.anomaly_scenarios]
    assert normal and [s for s in some.scenario_ids if s not in some.anomaly_scenarios] == normal
    for sid in normal:
        assert _tree(root / f"Scenario_{sid}") == _tree(tmp_path / "all" / f"Scenario_{sid}")


# --- determinism ----------------------------------------------------------------------------

def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_split(mono, tmp_path):
    root, summary = mono
    again = _write(tmp_path / "again")
    assert again.scenario_ids == summary.scenario_ids
    assert _tree(root) == _tree(tmp_path / "again")
    other = _write(tmp_path / "other", seed=6)
    assert set(other.scenario_ids).isdisjoint(summary.scenario_ids)
    a, b = _tree(root), _tree(tmp_path / "other")
    va = sorted(v for k, v in a.items() if "VOXEL_GRID_" in k)
    vb = sorted(v for k, v in b.items() if "VOXEL_GRID_" in k)
    assert va != vb


# --- csv records and poses -------------------------------------------------------------------

def test_csv_records(mono):
    root, summary = mono
    for sid in summary.scenario_ids:
        sc = root / f"Scenario_{sid}"
        for f in summary.frame_ids[sid]:
            rec = _kv(sc / "ACTION" / f"ACTION_{f}.csv")
            for key in ("speed", "throttle", "steer", "brake"):
                assert isinstance(rec[key], float)
            assert rec["frame_id"] == f and rec["scenario_id"] == sid
            m = np.asarray(rec["lidar transformation matrix"], np.float64)
            assert m.shape == (4, 4) and np.allclose(m[3], [0, 0, 0, 1])
            assert np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-5)
            inv = np.asarray(rec["lidar inverse transformation matrix"], np.float64)
            assert np.allclose(m @ inv, np.eye(4), atol=1e-4)
        if sid in summary.anomaly_scenarios:
            rec = _kv(sc / "ANOMALY" / f"ANOMALY_{summary.frame_ids[sid][0]}.csv")
            for key in ("frame_id", "scenario_id", "anomaly_id", "anomaly_type_id", "anomaly_is_alive",
                        "semantic_tags", "location", "velocity", "acceleration", "size"):
                assert key in rec
            assert rec["anomaly_type_id"].startswith("static.prop.o_")
            assert len(rec["location"]) == 3 and rec["velocity"] == (0.0, 0.0, 0.0)


def _to_world(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Stored (right-handed) sensor points → CARLA world (left-handed), by the ACTION matrix."""
    p = points[:, :3].astype(np.float64) * np.array([1.0, -1.0, 1.0])
    return p @ m[:3, :3].T + m[:3, 3]


def _from_world(world: np.ndarray, m: np.ndarray) -> np.ndarray:
    p = (world - m[:3, 3]) @ m[:3, :3]
    return p * np.array([1.0, -1.0, 1.0])


def _gt_hits(gt: np.ndarray, grid_points: np.ndarray, tags: np.ndarray) -> tuple[float, float]:
    """Share of the points' voxels present in `gt`, and of those the share with gt's label."""
    keys = GRID.keys(gt[:, :3])
    vox = voxelize(grid_points, labels=tags.astype(np.int32))
    hit = np.isin(vox.keys, keys)
    return hit.mean(), (gt[np.searchsorted(keys, vox.keys[hit]), 3] == vox.labels[hit]).mean()


def test_action_matrices_register_earlier_sweeps(mono):
    """Trees and poles of frame 0, moved with the ACTION matrices into frame 2's sensor
    frame, land on frame 2's ground-truth voxels with the same label; left unmoved they
    do not (the ego drove several metres)."""
    root, summary = mono
    for sid in summary.scenario_ids:
        sc = root / f"Scenario_{sid}"
        f0, f2 = summary.frame_ids[sid][0], summary.frame_ids[sid][2]
        (name, entry), = _point_folders(sc, "SEMANTIC-LIDAR")
        sem = np.load(sc / name / f"{name}_{f0}.npy")
        sem = sem[np.isin(sem[:, 3], COMPACT_TAGS) & (np.linalg.norm(sem[:, :3], axis=1) < 40)]
        m0 = np.asarray(_kv(sc / "ACTION" / f"ACTION_{f0}.csv")["lidar transformation matrix"])
        m2 = np.asarray(_kv(sc / "ACTION" / f"ACTION_{f2}.csv")["lidar transformation matrix"])
        t = SensorTransform(tuple(entry["location"]), tuple(entry["rotation"]))
        gt = _gt(sc, f2)

        registered, same = _gt_hits(gt, t.apply(_from_world(_to_world(sem, m0), m2)), sem[:, 3])
        unmoved, _ = _gt_hits(gt, t.apply(sem), sem[:, 3])
        assert registered > 0.3 and registered > 4 * unmoved and same > 0.95


# --- the stereo rig -------------------------------------------------------------------------

def test_stereo_sets_land_on_the_same_surfaces(stereo):
    root, summary = stereo
    sc = root / f"Scenario_{summary.scenario_ids[0]}"
    sems = _point_folders(sc, "SEMANTIC-LIDAR")
    assert [tuple(e["rotation"]) for _, e in sems] == [(0, 0, 0), (0, 0, -15), (0, 0, 15)]
    assert len(_point_folders(sc, "LIDAR")) == 3
    f = summary.frame_ids[summary.scenario_ids[0]][1]
    gt = _gt(sc, f)
    gt_keys = GRID.keys(gt[:, :3])

    def per_set(**variant):
        out = []
        for name, e in sems:
            sem = np.load(sc / name / f"{name}_{f}.npy")
            g = SensorTransform(tuple(e["location"]), tuple(e["rotation"]), **variant).apply(sem)
            out.append((sem, g, voxelize(g, labels=sem[:, 3].astype(np.int32))))
        return out

    sets = per_set()
    for sem, g, vox in sets:
        assert np.isin(vox.keys, gt_keys).all()
        assert np.allclose(g[sem[:, 3] == 1, 2], -3.6, atol=1e-4)   # one ground plane for all sets

    def overlap(a, b):
        near = lambda v: v.keys[np.linalg.norm(v.coords[:, :2] - 500, axis=1) < 60]  # noqa: E731
        ka, kb = near(a), near(b)
        return np.isin(ka, kb).mean()

    # road lines are 0.15 m wide bands across the road: every set sees them at the same y
    def line_offsets(sets_):
        ref = np.sort(sets_[0][1][(sets_[0][0][:, 3] == 24) & (np.abs(sets_[0][1][:, 0]) < 30), 1])
        out = []
        for sem, g, _ in sets_[1:]:
            y = g[(sem[:, 3] == 24) & (np.abs(g[:, 0]) < 30), 1]
            i = np.clip(np.searchsorted(ref, y), 1, len(ref) - 1)
            out.append(np.minimum(np.abs(y - ref[i - 1]), np.abs(y - ref[i])))
        return np.concatenate(out)

    assert len(line_offsets(sets)) > 50 and np.quantile(line_offsets(sets), 0.99) < 0.2
    wrong = per_set(negate_rotation=False)   # control: the side sets no longer line up
    assert np.quantile(line_offsets(wrong), 0.5) > 0.3
    good = min(overlap(sets[0][2], sets[k][2]) for k in (1, 2))
    bad = max(overlap(wrong[0][2], wrong[k][2]) for k in (1, 2))
    assert good > 0.5 and good > 2 * bad


# --- the ray caster -------------------------------------------------------------------------

def _one(kind, center, half, rot=None):
    from sparse_ad.synth.scene import SceneBuilder

    b = SceneBuilder()
    b.add(kind, center, half, 7, 0.5, rot)
    return b.build()


@pytest.mark.parametrize("kind,center,half,rot,expected,cos_expected", [
    (rc.ELLIPSOID, (10, 0, 1.8), (1, 1, 1), None, 9.0, 1.0),
    (rc.BOX, (5, 0, 1.8), (1, 1, 1), None, 4.0, 1.0),
    (rc.CYLINDER, (6, 0, 1.0), (0.5, 0.5, 1.0), None, 5.5, 1.0),
    (rc.BOX, (8, 0, 1.8), (1, 1, 1), "yaw45", 8 - math.sqrt(2), math.sqrt(0.5)),   # on the vertical edge
    (rc.ELLIPSOID, (10, 0, 1.8), (2, 0.5, 0.5), None, 8.0, 1.0),
    (rc.CYLINDER, (6, 0, 1.8), (0.5, 0.5, 2.0), "lying", 5.5, 1.0),   # axis along y
    (rc.CYLINDER, (6, 0, 1.8), (0.5, 0.5, 2.0), "pitch90", 4.0, 1.0),  # axis along x: the cap
    (rc.BOX, (0, 0, 1.8), (1, 1, 1), None, math.inf, 0.0),            # origin inside: no hit
])
def test_ray_hits_primitives_where_geometry_says(kind, center, half, rot, expected, cos_expected):
    from sparse_ad.synth.scene import rot_x, rot_y, rot_z

    r = {"yaw45": rot_z(math.pi / 4), "lying": rot_x(math.pi / 2), "pitch90": rot_y(math.pi / 2), None: None}[rot]
    prims = _one(kind, center, half, r)
    ground = rc.ground_params(5.0, -5.0, 3.5, 0.0)
    origin = np.array([0.0, 0.0, 1.8])
    t, tag, cos, _ = rc.cast(origin, np.eye(3), np.array([[1.0, 0.0, 0.0]]), 100.0, prims, prims.center, ground)
    if math.isinf(expected):
        assert math.isinf(t[0])
    else:
        assert t[0] == pytest.approx(expected, abs=1e-9) and tag[0] == 7
        assert cos[0] == pytest.approx(cos_expected, abs=1e-6)


def test_ray_hits_ground_and_road_lines():
    prims = _one(rc.BOX, (500, 500, 0), (1, 1, 1))       # far away, never hit
    ground = rc.ground_params(5.0, -5.0, 3.5, 0.0)
    el = math.radians(-10)
    d = np.array([[math.cos(el), 0.0, math.sin(el)],                              # straight ahead: centre line
                  [math.cos(el) * math.cos(1.2), math.cos(el) * math.sin(1.2), math.sin(el)]])
    t, tag, cos, _ = rc.cast(np.array([1.0, 0.0, 1.8]), np.eye(3), d, 100.0, prims, prims.center, ground)
    assert t[0] == pytest.approx(1.8 / math.sin(-el)) and cos[0] == pytest.approx(math.sin(-el))
    hit_y = t[1] * d[1, 1]
    assert hit_y > 5.0 and tag[1] == rc.TAG_TERRAIN
    assert tag[0] in (rc.TAG_ROAD_LINE, rc.TAG_ROAD)
    x_hit = 1.0 + t[0] * d[0, 0]
    assert tag[0] == (rc.TAG_ROAD_LINE if x_hit % 6.0 < 3.0 else rc.TAG_ROAD)


# --- CLI and errors -------------------------------------------------------------------------

def test_cli_writes_a_split(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    add_synth_args(parser)
    args = parser.parse_args([str(tmp_path / "cli"), "--scenarios", "1", "--frames", "1", "--seed", "2",
                              "--anomaly-share", "0", "--points", "640", "--no-progress"])
    assert run_synth(args) == 0
    assert "1 scenarios x 1 frames" in capsys.readouterr().out
    assert len(list((tmp_path / "cli").glob("Scenario_*-*"))) == 1
    args = parser.parse_args([str(tmp_path / "brk"), "--scenarios", "2", "--frames", "3", "--anomaly-share", "1",
                              "--braking-share", "0.5", "--points", "640", "--no-progress"])
    assert run_synth(args) == 0
    assert "2 with an anomaly (1 sudden braking)" in capsys.readouterr().out


@pytest.mark.parametrize("kw", [dict(sensor_sets="surround"), dict(points_per_sweep=10), dict(anomaly_share=1.5),
                                dict(braking_share=-0.1), dict(braking_share=0.5, frames=1),
                                dict(frames=0), dict(seed=-1)])
def test_bad_arguments_raise_config_error(tmp_path, kw):
    with pytest.raises(ConfigError):
        _write(tmp_path / "bad", **kw)


def test_lead_van_scores_split_the_van_by_what_it_does(braking, tmp_path):
    """Fake predictions (1.0 on tag 100, 0.5 on vehicles, 0 elsewhere) come out per category:
    every tag-100 voxel is the braking van, the same van before it brakes and the static
    scenario's lead van (in the lane before it turns off) are found as vehicles."""
    from sparse_ad.data.anovox import open_split
    from sparse_ad.engine.evaluate import prediction_file
    from sparse_ad.export import prediction_rows
    from sparse_ad.synth.lead_vans import lead_van_scores, replan

    root, summary = braking
    tag100 = 0
    for ref in open_split(root, None).frames:
        gt = _gt(ref.scenario.path, ref.frame)
        score = np.where(gt[:, 3] == 100, 1.0, np.where(np.isin(gt[:, 3], [14, 15]), 0.5, 0.0))
        tag100 += int((gt[:, 3] == 100).sum())
        path = prediction_file(tmp_path, ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, prediction_rows(gt[:, :3], score))
    r = lead_van_scores(root, tmp_path, threshold=0.75)["categories"]
    assert r["braking"]["voxels"] == tag100 > 0 and r["braking"]["median"] == 1.0
    assert r["braking"]["above_threshold"] == 1.0
    for other in ("same van, other frames", "other lead vans"):
        assert r[other]["voxels"] > 10 and r[other]["median"] == 0.5 and r[other]["above_threshold"] == 0.0
    assert set(replan(root)) == set(summary.scenario_ids)


def test_lead_van_scores_need_a_synthetic_split(mono, tmp_path):
    from sparse_ad.synth.lead_vans import replan

    root, _ = mono
    (tmp_path / "Scenario_Configuration_Files").mkdir()
    with pytest.raises(ConfigError, match="split written by `sparse-ad synth`"):
        replan(tmp_path)
    assert len(replan(root)) == 2


def _resolve(cache: str, queue) -> None:
    import contextlib
    import io
    import os

    os.environ["SPARSE_AD_CACHE"] = cache
    from sparse_ad.config import load_config
    from sparse_ad.engine.runtime import resolve_data_root

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        resolve_data_root(load_config("configs/demo.yaml", ["data.synth_scenarios=6", "data.synth_frames=2",
                                                            "data.synth_seed=3"]))
    queue.put(out.getvalue())


def test_two_processes_asking_for_the_same_synthetic_split_get_one_intact_copy(tmp_path, monkeypatch):
    """Two runs side by side on a fresh cache: one writes while the other waits (both writing
    deleted each other's scenario folders and left a split with frames missing)."""
    import multiprocessing as mp

    from sparse_ad.data.anovox import open_split

    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_resolve, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    printed = [queue.get(timeout=5) for _ in procs]
    assert sum("writing a synthetic" in text for text in printed) == 1
    split = open_split(next(p for p in tmp_path.glob("synth_*") if p.is_dir()))
    assert split.skipped_frames == 0 and len(split.frames) == 12


def test_writing_into_a_used_folder_names_what_it_replaced_and_what_it_left(tmp_path):
    """Same seed, fewer scenarios: the first is rewritten (its earlier frames are gone), the
    second is left for readers to mix in; both are said, each in one line."""
    write_split(tmp_path, 2, 2, seed=0, progress=False, points_per_sweep=2000)
    with pytest.warns(UserWarning) as caught:
        summary = write_split(tmp_path, 1, 1, seed=0, progress=False, points_per_sweep=2000)
    said = [str(w.message) for w in caught]
    assert any(f"replaced 1 scenario folder(s) an earlier run had written (e.g. Scenario_{summary.scenario_ids[0]})"
               in m for m in said)
    assert any("also holds 1 scenario folder(s) this run did not write" in m for m in said)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a fresh folder: nothing to say
        write_split(tmp_path / "fresh", 1, 1, seed=0, progress=False, points_per_sweep=2000)
