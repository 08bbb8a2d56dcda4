#!/usr/bin/env python
"""Where the time of one CUDA inference frame and one voxelize_cuda call goes (dev tool).

Host-side breakdown with a sync after each stage, plus torch.profiler tables (spconv and
gather_gemm engines; and one training step under autocast, whose conv kernels show whether
spconv trains in fp16). Prints a short summary and writes full tables under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_ad.bench import host_ms, lidar_cloud  # noqa: E402
from sparse_ad.config import load_config  # noqa: E402
from sparse_ad.grid import VoxelGrid  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("runs/profile"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    from numba import cuda

    from sparse_ad.models.sparse_tensor import to_sparse_tensor
    from sparse_ad.models.spunet import build_model, voxel_features
    from sparse_ad.voxelize import cuda as vcuda

    grid = VoxelGrid()
    dev = torch.device("cuda")
    host = lidar_cloud(120_000, seed=0).astype(np.float32)
    pts = torch.from_numpy(host).to(dev)
    r, errors = {}, {}
    # --- voxelizer pieces -------------------------------------------------------------
    r["vox_total"] = host_ms(lambda: vcuda.voxelize_cuda(pts, grid))
    r["vox_total_nosync_host"] = host_ms(lambda: vcuda.voxelize_cuda(pts, grid), sync=False)
    r["as_cuda_array"] = host_ms(lambda: cuda.as_cuda_array(pts, sync=False), sync=False)
    r["cuda_array_interface"] = host_ms(lambda: pts.__cuda_array_interface__, sync=False)
    r["torch_empty"] = host_ms(lambda: torch.empty(1000, device=dev), sync=False)
    r["torch_sort_24k"] = host_ms(lambda: torch.sort(pts[:24000, 0]))

    @cuda.jit
    def k_many(a, b, c, d, e, f, g, h, i, j, k, l, x1, x2, x3, x4, x5):
        pass

    @cuda.jit
    def k_one(a):
        pass

    views = [cuda.as_cuda_array(torch.zeros(100, device=dev), sync=False) for _ in range(12)]
    stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    k_many[1, 32, stream](*views, 1.0, 2.0, 3, 4, 5)
    k_one[1, 32, stream](views[0])
    r["launch_12arrays_5scalars"] = host_ms(lambda: k_many[1, 32, stream](*views, 1.0, 2.0, 3, 4, 5), sync=False)
    r["launch_1array"] = host_ms(lambda: k_one[1, 32, stream](views[0]), sync=False)
    kern = next(iter(k_many.overloads.values()))
    r["launch_12arrays_overload_direct"] = host_ms(
        lambda: kern.launch([*views, 1.0, 2.0, 3, 4, 5], (1, 1, 1), (32, 1, 1), stream, 0), sync=False)
    def gpus_context():   # what voxelize_cuda's `with cuda.gpus[i]:` costs: enter and exit
        with cuda.gpus[0]:
            pass

    r["gpus_context"] = host_ms(gpus_context, sync=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            vcuda.voxelize_cuda(pts, grid)
        torch.cuda.synchronize()
    (a.out / "vox_profile.txt").write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))

    # --- inference pieces -----------------------------------------------------------------
    for name, over in (("default", []), ("slim", ["model.channels=[16,32,64,128]", "model.blocks_per_level=1"])):
        cfg = load_config(None, over)
        model = build_model(cfg.model).to(dev).eval()
        vox = vcuda.voxelize_cuda(pts, grid)
        feats = voxel_features(vox, grid)
        bi = torch.zeros(len(vox.keys), dtype=torch.int32, device=dev)
        x = to_sparse_tensor(feats, vox.coords, bi, grid.shape, 1)

        def fwd(half=True, x=x, model=model):
            with torch.no_grad(), torch.autocast("cuda", enabled=half, dtype=torch.float16):
                return model(x)

        def full(model=model):
            with torch.no_grad():
                p = torch.from_numpy(host).to(dev, non_blocking=True)
                v = vcuda.voxelize_cuda(p, grid)
                f = voxel_features(v, grid)
                b = torch.zeros(len(v.keys), dtype=torch.int32, device=dev)
                xx = to_sparse_tensor(f, v.coords, b, grid.shape, 1)
                with torch.autocast("cuda", dtype=torch.float16):
                    return torch.sigmoid(model(xx).voxel_logits.float())

        r[f"{name}_forward_fp16"] = host_ms(fwd)
        r[f"{name}_forward_fp32"] = host_ms(lambda: fwd(False))
        r[f"{name}_forward_fp16_host"] = host_ms(fwd, sync=False)
        r[f"{name}_to_sparse_tensor"] = host_ms(
            lambda f=feats, v=vox, b=bi: to_sparse_tensor(f, v.coords, b, grid.shape, 1))
        r[f"{name}_full_frame"] = host_ms(full)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fwd()
            torch.cuda.synchronize()
        (a.out / f"fwd_{name}_cpu.txt").write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=50))
        (a.out / f"fwd_{name}_cuda.txt").write_text(prof.key_averages().table(sort_by="cuda_time_total",
                                                                                row_limit=50))
    # --- the gather_gemm engine (fp16), and which conv kernels a training step runs -----------
    from sparse_ad.models.inference import fuse_for_inference

    model = build_model(load_config(None, []).model).to(dev)
    vox = vcuda.voxelize_cuda(pts, grid)
    x = to_sparse_tensor(voxel_features(vox, grid), vox.coords,
                         torch.zeros(len(vox.keys), dtype=torch.int32, device=dev), grid.shape, 1)
    from sparse_ad.models.gather_gemm import GATHER_MODES
    from sparse_ad.models.graphs import error_chain

    fused = fuse_for_inference(model.eval(), half=True)
    for mode in GATHER_MODES:   # each way of gathering rows: whole forward, its host part, GPU time
        gemm = fuse_for_inference(fused, engine="gather_gemm", gather=mode)
        r[f"default_gather_gemm_{mode}_fp16"] = host_ms(lambda g=gemm: g(x))
        r[f"default_gather_gemm_{mode}_fp16_host"] = host_ms(lambda g=gemm: g(x), sync=False)
        kernels = _profile(a.out / f"fwd_gather_gemm_{mode}", lambda g=gemm: g(x))
        r[f"default_gather_gemm_{mode}_gpu"] = sum(kernels.values()) / 1e3   # device time per forward
        try:   # the first call captures; a failure must not cost the other numbers
            graphed = fuse_for_inference(fused, engine="gather_gemm_graphs", gather=mode)
            r[f"default_graphs_{mode}_fp16"] = host_ms(lambda g=graphed: g(x))
        except Exception as e:   # noqa: BLE001
            errors[f"graphs_{mode}"] = error_chain(e)
    model.train()

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).voxel_logits.float().square().mean()
        loss.backward()

    kernels = _profile(a.out / "train_step", step)
    conv = {k: v for k, v in kernels.items() if k.startswith("cumm::conv")}
    total = sum(conv.values()) or 1.0
    # tensor-core kernels are named by their operand types: f16f16f16... vs Simt_f32f32f32...
    r["train_conv_kernel_share_f16"] = sum(v for k, v in conv.items() if "f16f16" in k) / total
    r["h2d_120k_f32x4"] = host_ms(lambda: torch.from_numpy(host).to(dev))
    h64 = np.concatenate([host.astype(np.float64), np.zeros((len(host), 2))], axis=1)
    r["h2d_120k_f64x6"] = host_ms(lambda: torch.from_numpy(h64).to(dev))
    (a.out / "profile.json").write_text(json.dumps({**r, "errors": errors}, indent=2))
    for k, v in r.items():
        print(f"{k:<40} {v:8.3f}{'' if k.startswith('train_conv') else ' ms'}")
    for k, v in errors.items():
        print(f"{k}: {v}")
    return 0


def _profile(stem: Path, fn, calls: int = 5) -> dict:
    """Device time (us) per call of fn, per kernel (memset, copy) name, from `calls` calls;
    tables to stem_{cpu,cuda}.txt. Only the device's own events: an op's row repeats the time
    of the kernels it launched."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    Path(f"{stem}_cpu.txt").write_text(avg.table(sort_by="cpu_time_total", row_limit=50))
    Path(f"{stem}_cuda.txt").write_text(avg.table(sort_by="cuda_time_total", row_limit=50))
    from torch.autograd import DeviceType

    return {e.key: float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0))
            / calls for e in avg if e.device_type == DeviceType.CUDA}


if __name__ == "__main__":
    sys.exit(main())
