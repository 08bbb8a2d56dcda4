"""The CUDA voxelizer, checked without a GPU.

1. `cudasim_cases.py` compares the kernels with the CPU path bit for bit under numba's CUDA
   simulator. The simulator is chosen when numba is first imported (NUMBA_ENABLE_CUDASIM),
   and this process imported numba long ago, so the cases run in a child pytest with the
   variable set; its output is shown when it fails. A child process is the one robust way:
   no import-order tricks, and the main suite keeps the real `numba.cuda`.
2. The kernels are compiled to PTX for sm_90 with NVVM (no GPU needed, but NVVM is: a CUDA
   toolkit or the `nvidia-cuda-nvcc-cu12` wheel; skipped without it). This type-checks them
   for the real target, which the simulator (plain Python) never does, and checks that no
   float64 fused multiply-add crept in (it would round differently from the CPU).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from numba import cuda

from sparse_ad.grid import VoxelGrid
from sparse_ad.voxelize import cuda as vcuda

CASES = Path(__file__).with_name("cudasim_cases.py")


def test_kernels_match_cpu_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)]
    proc = subprocess.run(cmd, env=env, cwd=CASES.parent.parent, capture_output=True, text=True,
                          timeout=900)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"simulator cases failed:\n{tail}"
    assert re.search(r"\b\d+ passed", proc.stdout), tail


class _RecordingBackend(vcuda.NumpyBackend):
    """Runs `_voxelize_device`'s host side but only records each launch's argument types."""

    def __init__(self):
        super().__init__()
        self.launches = []

    def launch(self, kernel, nthreads):
        def record(*args):
            self.launches.append((kernel.py_func, tuple(numba.typeof(a) for a in args)))
        return record

    def read_count(self, counters):
        return 4                                   # pretend K1 found 4 voxels


def _nvvm_or_skip(monkeypatch):
    if vcuda.SIMULATOR:
        pytest.skip("the simulator has no NVVM")
    if "CUDA_HOME" not in os.environ:
        try:
            import nvidia.cuda_nvcc as wheel  # the nvidia-cuda-nvcc-cu12 wheel, if any
            monkeypatch.setenv("CUDA_HOME", list(wheel.__path__)[0])
        except ImportError:
            pass
    try:
        from numba.cuda.cudadrv.nvvm import NVVM

        NVVM()
    except Exception as e:  # noqa: BLE001 - any failure to load NVVM means: cannot check here
        pytest.skip(f"NVVM not found ({type(e).__name__}); install a CUDA toolkit or "
                    "nvidia-cuda-nvcc-cu12 and set CUDA_HOME")
    if not cuda.is_available():
        # device functions ask the current device for its compute capability; there is none
        class Device:
            compute_capability = (9, 0)

        monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device", lambda: Device)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("grid", [VoxelGrid(), VoxelGrid().with_resolution(0.1)], ids=["0.5m", "0.1m"])
def test_kernels_compile_for_sm90_without_fused_multiply_add(monkeypatch, dtype, grid):
    _nvvm_or_skip(monkeypatch)
    backend = _RecordingBackend()
    points = np.zeros((10, 4), dtype)
    vcuda._voxelize_device(points, np.zeros(10, np.int32), grid, backend)
    assert [f.__name__ for f, _ in backend.launches] == ["_k_insert", "_k_ties", "_k_finalize"]
    for func, sig in backend.launches:
        ptx, _ = cuda.compile_ptx(func, sig, cc=(9, 0))
        assert "fma.rn.f64" not in ptx, f"{func.__name__}: float64 FMA would break CPU parity"
        assert "atom.global.cas.b64" in ptx or func.__name__ != "_k_insert"
