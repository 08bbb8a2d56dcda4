import json
import warnings

import numpy as np
import pytest

from sparse_ad.data.anovox import load_frame, open_split
from sparse_ad.data.files import load_points, load_voxel_grid, read_kv_csv
from sparse_ad.errors import SparseADError
from tests.conftest import MONO


def test_discovers_scenarios_and_frames(tiny_split):
    split = open_split(tiny_split)
    assert len(split.scenarios) == 4  # Scenario_Configuration_Files is skipped
    assert [f.frame for f in split.frames[:3]] == [100, 101, 102]
    sc = split.scenarios[0]
    (lidar,) = sc.sensors_of("LIDAR")
    assert lidar.location == (0.0, 0.0, 1.8) and lidar.rotation == (0.0, 0.0, 0.0)
    assert lidar.file(7).name == f"{MONO}_7.npy"


def test_falls_back_to_folder_name_without_sensor_setup(tiny_split):
    for p in tiny_split.glob("Scenario_*/sensor_setup.json"):
        p.unlink()
    (lidar,) = open_split(tiny_split).scenarios[0].sensors_of("LIDAR")
    assert lidar.location == (0.0, 0.0, 1.8) and lidar.file_ending == ".npy"


def test_sensor_setup_wins_over_folder_name(tiny_split):
    p = next(tiny_split.glob("Scenario_*/sensor_setup.json"))
    data = json.loads(p.read_text())
    data[MONO]["location"] = [0, 0, 2.0]
    p.write_text(json.dumps(data))
    sc = next(s for s in open_split(tiny_split).scenarios if s.path == p.parent)
    assert sc.sensors_of("LIDAR")[0].location == (0.0, 0.0, 2.0)


def test_a_setup_entry_without_a_pose_takes_it_from_the_folder_name(tiny_split):
    p = next(tiny_split.glob("Scenario_*/sensor_setup.json"))
    data = json.loads(p.read_text())
    data[MONO]["rotation"] = [0, 0, 5]
    del data[MONO]["location"]
    p.write_text(json.dumps(data))
    sc = next(s for s in open_split(tiny_split).scenarios if s.path == p.parent)
    lidar = sc.sensors_of("LIDAR")[0]
    assert lidar.location == (0.0, 0.0, 1.8) and lidar.rotation == (0.0, 0.0, 5.0)


@pytest.mark.parametrize("key,value", [("file_ending", 5), ("sensor_type", ["LIDAR"])])
def test_a_setup_entry_with_a_non_string_type_or_ending_is_refused(tiny_split, key, value):
    p = next(tiny_split.glob("Scenario_*/sensor_setup.json"))
    data = json.loads(p.read_text())
    data[MONO][key] = value
    p.write_text(json.dumps(data))
    with pytest.raises(SparseADError, match=rf"sensor_setup.json: entry .* has {key} .*must be a string"):
        open_split(tiny_split)


def test_frames_missing_a_modality_are_skipped_and_counted(tiny_split):
    sc = sorted(tiny_split.glob("Scenario_*"))[0]
    (sc / "VOXEL_GRID" / "VOXEL_GRID_101.npy").unlink()
    with pytest.warns(UserWarning, match="1 frame"):
        split = open_split(tiny_split)
    assert split.skipped_frames == 1
    assert [f.frame for f in split.frames if f.scenario.path == sc] == [100, 102]


def test_load_frame_types(tiny_split):
    ref = open_split(tiny_split).frames[0]
    fr = load_frame(ref, with_meta=True)
    (sensor, pts), = fr.points
    assert pts.dtype == np.float32 and pts.shape[1] == 4
    assert fr.gt.dtype == np.uint16 and fr.gt.shape[1] == 4
    assert fr.anomaly["anomaly_is_alive"] is True and fr.anomaly["size"] == (1.5, 2.0, 1.3)
    assert fr.action["lidar transformation matrix"].shape == (4, 4)
    g = fr.grid_points()
    assert np.allclose(g[:, 2], pts[:, 2].astype(np.float64) - 1.8)


def test_empty_or_missing_split(tmp_path):
    with pytest.raises(SparseADError, match="not found"):
        open_split(tmp_path / "nope")
    with pytest.raises(SparseADError, match=r"no usable frames \(no Scenario_\* folder with matching LIDAR and "
                                            r"VOXEL_GRID files\); check the path$"):
        open_split(tmp_path)
    (tmp_path / "Scenario_0001").mkdir()   # one scenario's folder passed instead of the split's
    with pytest.raises(SparseADError, match=r"matching LIDAR files\); check the path \(pass the folder above it, "):
        open_split(tmp_path / "Scenario_0001", need_gt=False)


def test_pickled_npy_is_refused_never_loaded(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(SparseADError, match="pickled object array"):
        load_points(bad)
    import pickle

    bad.write_bytes(pickle.dumps(Payload()))        # a bare pickle named .npy
    with pytest.raises(SparseADError, match="pickled object array"):
        load_points(bad)
    assert not marker.exists()
    bad.write_text("x y z i\n1 2 3 4\n")            # text saved as .npy: not called a pickle
    with pytest.raises(SparseADError, match=r"bad.npy: not a .npy file \(no .npy header\)"):
        load_points(bad)


@pytest.mark.parametrize("content, match", [
    (b"", "truncated or not a .npy"),
    (b"\x93NUMPY\x01\x00garbage", "truncated|not a readable"),
])
def test_truncated_npy(tmp_path, content, match):
    p = tmp_path / "t.npy"
    p.write_bytes(content)
    with pytest.raises(SparseADError, match=match):
        load_points(p)


def test_wrong_shape_and_dtype(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((5, 3), np.float32))
    with pytest.raises(SparseADError, match=r"expected shape \(N, 4\)"):
        load_points(tmp_path / "a.npy")
    np.save(tmp_path / "b.npy", np.zeros((5, 4), np.float32))
    with pytest.raises(SparseADError, match="dtype kind"):
        load_voxel_grid(tmp_path / "b.npy")
    np.save(tmp_path / "c.npy", np.array([[0, 0, 0, 1.5]], np.float32))
    with pytest.raises(SparseADError, match="not integers"):
        load_points(tmp_path / "c.npy", semantic=True)


@pytest.mark.parametrize("xyz_type,rgb_type", [(np.float32, np.uint32), (np.float64, np.float32)])
def test_semantic_pcd_rgb_is_read_in_its_own_type(tmp_path, xyz_type, rgb_type):
    """rgb as uint32, or float32 beside float64 xyz: numpy() would cast all fields to one type."""
    from pypcd4 import PointCloud
    from pypcd4.pypcd4 import MetaData

    fields, types = ("x", "y", "z", "rgb"), (xyz_type,) * 3 + (rgb_type,)
    data = np.empty(2, dtype=list(zip(fields, types, strict=True)))
    data["x"], data["y"], data["z"] = [1, 4], [2, 5], [3, 6]
    packed = PointCloud.encode_rgb(np.array([[245, 0, 0], [128, 64, 128]], np.uint8)).view(np.uint32)
    data["rgb"] = packed.view(rgb_type)   # the same bits either way
    meta = MetaData.model_validate({"fields": fields, "size": [np.dtype(t).itemsize for t in types],
                                    "type": [np.dtype(t).kind.upper() for t in types], "count": [1] * 4,
                                    "points": 2, "width": 2})
    PointCloud(meta, data).save(tmp_path / "s.pcd")
    pts = load_points(tmp_path / "s.pcd", semantic=True)
    assert pts[:, 3].tolist() == [29, 1] and pts[:, :3].tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize("bad", [70000.0, -3.0, np.nan, 5.7])
def test_semantic_pcd_tag_field_is_checked_like_npy(tmp_path, bad):
    """A PCD's tag field goes through the same check: 70000 would wrap to 4464 in the uint16
    ground truth, NaN become 0, 5.7 round to 6 — all silently."""
    from pypcd4 import PointCloud

    PointCloud.from_xyzl_points(np.array([[10, 0, 0, 1], [11, 0, 0, bad]], np.float32)).save(tmp_path / "s.pcd")
    with pytest.raises(SparseADError, match="s.pcd: 1 semantic tags are not integers"):
        load_points(tmp_path / "s.pcd", semantic=True)


def test_csv_parsing(tmp_path):
    p = tmp_path / "A.csv"
    p.write_text("anomaly_is_alive ; False\nspeed ; 3.5\nname ; some text ; with separator\n"
                 "size ; (1, 2, 3)\nevil ; __import__('os').system('true')\n")
    d = read_kv_csv(p)
    assert d["anomaly_is_alive"] is False and d["speed"] == 3.5 and d["size"] == (1, 2, 3)
    assert d["name"] == "some text ; with separator"
    assert isinstance(d["evil"], str)  # literals only: never evaluated
    p.write_text("no separator here\n")
    with pytest.raises(SparseADError, match="A.csv:1"):
        read_kv_csv(p)


def test_semantic_pcd_with_cityscapes_colours(tmp_path):
    from pypcd4 import PointCloud

    xyz = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.float32)
    rgb = PointCloud.encode_rgb(np.array([[128, 64, 128], [245, 0, 0], [1, 2, 3]], np.uint8))
    pc = PointCloud.from_xyzrgb_points(np.concatenate([xyz, rgb[:, None].astype(np.float32)], 1))
    pc.save(tmp_path / "s.pcd")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pts = load_points(tmp_path / "s.pcd", semantic=True)
    assert pts[:, 3].tolist() == [1, 29, 0]  # road, anomaly, unknown colour → unlabeled
    assert any("Cityscapes" in str(x.message) for x in w)
    assert np.allclose(pts[:, :3], xyz)


def test_frame_ids_are_plain_integers_others_are_skipped_with_a_warning(tiny_split):
    """`_0100` or `_¹` would name a frame whose files the readers (which rebuild names from
    the integer) cannot find: skipped at discovery with a warning, never a crash later."""
    sc = sorted(tiny_split.glob("Scenario_*"))[0]
    src = sc / MONO / f"{MONO}_100.npy"
    (sc / MONO / f"{MONO}_0100.npy").write_bytes(src.read_bytes())        # beside the real one
    (sc / MONO / f"{MONO}_101.npy").rename(sc / MONO / f"{MONO}_0101.npy")   # instead of it
    (sc / MONO / f"{MONO}_\u00b9.npy").write_bytes(src.read_bytes())
    with pytest.warns(UserWarning, match="leading zero or non-ASCII digits and are skipped.*rename"):
        split = open_split(tiny_split)
    frames = [f for f in split.frames if f.scenario.path == sc]
    assert [f.frame for f in frames] == [100, 102]
    for ref in frames:
        load_frame(ref, "LIDAR")


def test_non_utf8_folder_names_do_not_break_discovery(tiny_split):
    import os

    os.mkdir(os.path.join(os.fsencode(tiny_split), b"Scenario_\xff\xfe-bad"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = open_split(tiny_split)
    assert len(split.scenarios) == 4  # the empty, oddly named scenario has no frames
