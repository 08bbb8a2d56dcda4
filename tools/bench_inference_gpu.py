#!/usr/bin/env python
"""Unfused SpUNet (fp32 / autocast) against the BN-folded InferenceUNet (fp32 / fp16) on real
voxelized frames on CUDA: accuracy vs the unfused fp32 eval model and timings (dev tool).

Timings: median of repeats after warm-up; `sync` = wall time with a sync at the end (what a
frame costs), `host` = host time to enqueue (no sync), `gpu` = CUDA-event time."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_ad.bench import host_ms, lidar_cloud  # noqa: E402
from sparse_ad.config import load_config  # noqa: E402
from sparse_ad.grid import VoxelGrid  # noqa: E402


def main() -> int:
    from spconv.pytorch.conv import SparseConvolution

    from sparse_ad.models.inference import fuse_for_inference
    from sparse_ad.models.sparse_tensor import to_sparse_tensor
    from sparse_ad.models.spunet import build_model, voxel_features
    from sparse_ad.voxelize import voxelize

    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()) + " (example: python "
                                "tools/bench_inference_gpu.py --out runs/infer)")
    p.add_argument("--out", type=Path, default=Path("runs/infer"), help="folder for the JSON results")
    out = p.parse_args().out
    if not torch.cuda.is_available():
        print("bench_inference_gpu: error: needs a CUDA device", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    dev, grid = torch.device("cuda"), VoxelGrid()
    torch.manual_seed(0)
    model = build_model(load_config(None, []).model).to(dev)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():   # non-trivial BN, as after training
        if isinstance(m, torch.nn.BatchNorm1d):
            c = m.num_features
            m.running_mean.copy_((torch.randn(c, generator=g) * 0.3).to(dev))
            m.running_var.copy_((torch.rand(c, generator=g) * 1.5 + 0.3).to(dev))
            m.weight.data.copy_((torch.randn(c, generator=g) * 0.3 + 1).to(dev))
            m.bias.data.copy_((torch.randn(c, generator=g) * 0.3).to(dev))
    model.eval()
    f32, f16 = fuse_for_inference(model), fuse_for_inference(model, half=True)
    r = {"device": torch.cuda.get_device_name(), "n_convs": sum(isinstance(m, SparseConvolution)
                                                                for m in model.modules())}
    xs = []
    for seed in range(3):   # real voxelized frames
        pts = torch.from_numpy(lidar_cloud(120_000, seed=seed)).to(dev)
        vox = voxelize(pts, grid)
        feats = voxel_features(vox, grid)
        bi = torch.zeros(len(feats), dtype=torch.int32, device=dev)
        xs.append((feats, vox.coords, bi))
    r["voxels"] = [len(x[0]) for x in xs]

    def make(i=0):
        f, c, b = xs[i]
        return to_sparse_tensor(f, c, b, grid.shape, 1, check_range=False)

    variants = {
        "unfused_fp32": lambda x: model(x).voxel_logits,
        "unfused_amp": lambda x: _amp(model, x),
        "fused_fp32": lambda x: f32(x).voxel_logits,
        "fused_fp16": lambda x: f16(x).voxel_logits,
    }
    with torch.no_grad():
        for name, fn in variants.items():
            try:
                _variant(r, name, fn, model, make, len(xs))
            except Exception as e:  # noqa: BLE001 - record and go on with the other variants
                r[f"{name}_error"] = repr(e)[:300]
        # spconv per-layer host cost: one 32->32 subm conv, indices already built (cached key)
        conv = f16.enc0[0].conv1
        x = f16.stem(spconv_tensor(make(), torch.float16, f16))
        r["one_subm_conv_fp16_cached_host_ms"] = host_ms(lambda: conv(x), sync=False)
        r["one_subm_conv_fp16_cached_sync_ms"] = host_ms(lambda: conv(x))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                f16(make())
            torch.cuda.synchronize()
    (out / "fused_fp16_prof.txt").write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=45)
                                             + "\n\n" + prof.key_averages().table(sort_by="cuda_time_total",
                                                                                   row_limit=30))
    (out / "infer.json").write_text(json.dumps(r, indent=2))
    for k, v in r.items():
        print(f"{k:<40} {v}")
    return 0


def _variant(r, name, fn, model, make, n):
    errs = []
    for i in range(n):
        ref = model(make(i)).voxel_logits.double()
        o = fn(make(i)).double()
        errs.append(float((o - ref).norm() / ref.norm()) if torch.isfinite(o).all() else float("nan"))
    r[f"{name}_relerr_max"] = max(errs)
    r[f"{name}_sync_ms"] = host_ms(lambda: fn(make()))
    r[f"{name}_host_ms"] = host_ms(lambda: fn(make()), sync=False)
    r[f"{name}_sync_ms_rep2"] = host_ms(lambda: fn(make()))


def _amp(model, x):
    with torch.autocast("cuda", dtype=torch.float16):
        return model(x).voxel_logits.float()


def spconv_tensor(x, dtype, model):
    import spconv.pytorch as spconv

    from sparse_ad.models.spunet import padded_shape
    model._use_device(x.features.device)
    return spconv.SparseConvTensor(x.features.to(dtype), x.indices, padded_shape(x.spatial_shape, model.stride),
                                   x.batch_size)


if __name__ == "__main__":
    sys.exit(main())
