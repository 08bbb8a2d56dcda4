"""Fuzz the readers: arbitrary bytes give a valid result or a SparseADError, nothing else."""

import io
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_ad.data.anovox import _read_sensor_setup
from sparse_ad.data.files import load_points, load_voxel_grid, read_kv_csv
from sparse_ad.errors import SparseADError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _mutations():
    """Valid npy files with bytes cut or flipped, plus plain garbage."""
    base = _npy_bytes(np.arange(40, dtype=np.float32).reshape(10, 4))
    cut = st.integers(0, len(base)).map(lambda k: base[:k])
    flip = st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)).map(
        lambda t: base[:t[0]] + bytes([t[1]]) + base[t[0] + 1:])
    return st.one_of(cut, flip, st.binary(max_size=300))


def _call(fn, path, *args):
    try:
        return fn(path, *args)
    except SparseADError:
        return None


@FUZZ
@given(data=_mutations())
def test_npy_readers(tmp_path, data):
    p = tmp_path / "f.npy"
    p.write_bytes(data)
    pts = _call(load_points, p)
    if pts is not None:
        assert pts.dtype == np.float32 and pts.ndim == 2 and pts.shape[1] == 4
    rows = _call(load_voxel_grid, p)
    if rows is not None:
        assert rows.dtype == np.uint16 and rows.shape[1] == 4


@FUZZ
@given(arr=st.sampled_from([np.float64, np.int32, np.uint8, np.float16, np.bool_, np.complex64]).flatmap(
    lambda dt: st.tuples(st.integers(0, 5), st.integers(1, 6)).map(lambda s: np.ones(s, dtype=dt))))
def test_npy_dtype_and_shape_variants(tmp_path, arr):
    p = tmp_path / "f.npy"
    np.save(p, arr)
    pts = _call(load_points, p, True)
    if pts is not None:
        assert pts.shape[1] == 4 and arr.dtype.kind == "f"


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200))
def test_csv_and_json_readers(tmp_path, text):
    p = tmp_path / "A.csv"
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    d = _call(read_kv_csv, p)
    assert d is None or isinstance(d, dict)
    j = tmp_path / "sensor_setup.json"
    j.write_bytes(p.read_bytes())
    s = _call(_read_sensor_setup, j)
    assert s is None or isinstance(s, dict)


def test_sensor_setup_with_wrong_types_is_reported(tmp_path):
    from sparse_ad.data.anovox import open_split
    from tests.conftest import MONO, write_scenario

    sc = write_scenario(tmp_path, "s1", [1], anomaly=False)
    (sc / "sensor_setup.json").write_text(json.dumps({MONO: {"sensor_type": "LIDAR", "location": "up"}}))
    try:
        open_split(tmp_path)
    except SparseADError as e:
        assert "sensor_setup.json" in str(e) and "location" in str(e)
    else:
        raise AssertionError("a bad location must be reported")
