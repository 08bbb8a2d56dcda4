"""Training throughput and inference latency of the full step (`tools/bench_model.py`).

What a user on a CUDA machine wants to know before a long run: frames/s of a training step
(voxelize on the device + U-Net forward/backward + optimizer, AMP), peak GPU memory, and the
latency of one inference frame: host float32 (N, 4) points (xyz, intensity; pinned, as a
loader would hand them over) → device → voxelize → features → BN-folded U-Net
(`fuse_for_inference`, real fp16 on CUDA) → sigmoid, with its two parts timed apart (voxelize
incl. the copy and features; U-Net incl. the sparse tensor and sigmoid), for each engine:
spconv, `gather_gemm` and, on CUDA, its CUDA-graph form (with how far their probabilities are
from spconv's), and the gather engines with each other way of reading neighbours
(`gather_gemm.GATHER_MODES`; how far their probabilities are from the default mode's). The
unfused model under autocast (the eval path before folding) is timed too, for comparison;
test-time views and `eval`'s batches run on the device's default engine
(`config.DEFAULT_ENGINE`), as `eval` does.
Inputs are LiDAR-like sweeps of `points` points on the AnoVox grid (`bench.lidar_cloud`), so
no dataset is needed. Timings on CUDA use events after warm-up; on CPU, perf_counter. The
training step is the median of `repeats`; the inference variants are timed in turn, round
after round (`latency_rounds`), so the whole and its parts share conditions, and each gets a
median and a 10-90% spread. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from sparse_ad.bench import interleaved_ms, lidar_cloud, machine_info, median_ms, positive_int
from sparse_ad.config import DEFAULT_ENGINE, load_config
from sparse_ad.data.batch import Batch, voxelize_batch
from sparse_ad.errors import reported
from sparse_ad.io import atomic_write_text


def _batch(points: int, batch_size: int, seed: int) -> Batch:
    pts, tgts = [], []
    for b in range(batch_size):
        p = lidar_cloud(points, seed=seed + b).astype(np.float64)
        t = np.zeros(len(p), np.int8)
        t[np.linalg.norm(p[:, :2] - [12.0, 0.0], axis=1) < 1.0] = 1  # a small "anomaly" patch
        pts.append(p)
        tgts.append(t)
    return Batch(list(range(batch_size)), [f"bench/{b}" for b in range(batch_size)], pts, tgts,
                 [True] * batch_size)


def bench_model(config: str | None = None, overrides=(), points: int = 120_000, batch_size: int = 4,
                repeats: int = 10, warmup: int = 3, device: str = "auto", seed: int = 0,
                latency_rounds: int = 100) -> dict:
    from sparse_ad.engine.checkpoint import build_optimizer
    from sparse_ad.engine.runtime import pick_device
    from sparse_ad.engine.validate import frame_scores
    from sparse_ad.losses import Targets, build_loss
    from sparse_ad.models.inference import fuse_for_inference
    from sparse_ad.models.sparse_tensor import to_sparse_tensor
    from sparse_ad.models.spunet import build_model, voxel_features
    from sparse_ad.voxelize import voxelize

    cfg = load_config(config, list(overrides))
    dev = pick_device(device, setting="--device")
    amp = dev.type == "cuda" and cfg.train.amp
    grid = cfg.grid.build()
    torch.manual_seed(seed)
    model = build_model(cfg.model).to(dev)
    opt = build_optimizer(cfg, model)
    loss_fn = build_loss(cfg.loss, [1_000_000, 1_000])
    scaler = torch.amp.GradScaler(dev.type, enabled=amp)
    batch = _batch(points, batch_size, seed)

    def train_step():
        vb = voxelize_batch(batch, grid, dev)
        x = to_sparse_tensor(vb.features, vb.coords, vb.batch_index, grid.shape, vb.batch_size)
        with torch.autocast(dev.type, enabled=amp, dtype=torch.float16):
            out = model(x)
        loss, _ = loss_fn(out, Targets(vb.targets, vb.valid, vb.batch_index.long(), vb.frame_labels))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    one = Batch([0], ["bench/0"], batch.points[:1], batch.point_targets[:1], [True])

    def infer_unfused():   # the eval path before BN folding: SpUNet under autocast
        model.eval()
        vb = voxelize_batch(one, grid, dev)
        frame_scores(model, vb, grid, amp)
        model.train()

    host = torch.from_numpy(np.ascontiguousarray(batch.points[0][:, :4], dtype=np.float32))
    if dev.type == "cuda":
        host = host.pin_memory()
    last = {}

    def vox_part():
        pts = host.to(dev, non_blocking=True) if dev.type == "cuda" else host.numpy()
        vox = voxelize(pts, grid)
        feats = torch.as_tensor(voxel_features(vox, grid), device=dev)
        last["x"] = (feats, torch.as_tensor(vox.coords, device=dev))

    def unet_part(net=None):
        feats, coords = last["x"]
        bi = torch.zeros(len(feats), dtype=torch.int32, device=dev)
        x = to_sparse_tensor(feats, coords, bi, grid.shape, 1, check_range=False)
        return torch.sigmoid((net or fused)(x).voxel_logits)

    def infer():
        vox_part()
        unet_part()

    def infer_gemm():   # the same path with the gather + GEMM engine
        vox_part()
        unet_part(gemm)

    def infer_graphs():   # ... with its convs replayed from CUDA graphs
        vox_part()
        unet_part(graphed)

    def infer_views():   # the whole path with the config's test-time views, batched as `eval` runs them
        vox_part()
        feats, coords = last["x"]
        vb = SimpleNamespace(features=feats, coords=coords.int(), batch_size=1,
                             batch_index=torch.zeros(len(feats), dtype=torch.int32, device=dev))
        frame_scores(default, vb, grid, amp=False, views=cfg.model.test_views)

    def eval_batch():   # what `eval` does per batch: batch_size frames (x test views) in one pass
        vb = voxelize_batch(batch, grid, dev)
        frame_scores(default, vb, grid, amp=False, views=cfg.model.test_views).cpu()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    results = {"train_step": float(median_ms(dev.type, repeats, train_step, warmup=warmup))}
    peak_mb = {}
    if dev.type == "cuda":   # training's peak alone; the inference stages below get their own
        peak_mb["train"] = torch.cuda.max_memory_allocated(dev) / 2**20
        torch.cuda.reset_peak_memory_stats(dev)
    fused = fuse_for_inference(model.eval(), half=dev.type == "cuda")   # from the trained weights and BN stats
    gemm = fuse_for_inference(fused, engine="gather_gemm")
    default = fuse_for_inference(fused, engine=None)   # what `eval` runs on this device
    model.train()
    vox_part()
    a, b = unet_part(), unet_part(gemm)
    results["gather_gemm_max_abs_diff"] = float((a.float() - b.float()).abs().max())   # probabilities
    stages = {"inference": infer, "inference_voxelize": vox_part, "inference_unet": unet_part,
              "inference_unfused": infer_unfused, "inference_gather_gemm": infer_gemm,
              "inference_unet_gather_gemm": lambda: unet_part(gemm)}
    if dev.type == "cuda":
        try:   # the first forward captures the graph; a failure must not cost the other numbers
            graphed = fuse_for_inference(fused, engine="gather_gemm_graphs")
            g = unet_part(graphed)
            results["graphs_max_abs_diff"] = float((a.float() - g.float()).abs().max())
            results["graphs_capture_ms"] = graphed.capture_s * 1e3   # the one capture of this frame's signature
            results["graphs_vs_gather_gemm_max_abs_diff"] = float((b.float() - g.float()).abs().max())
            if DEFAULT_ENGINE[dev.type] == "gather_gemm_graphs":
                default = graphed   # one graph pool, not two: peak memory as `eval` has it
            stages.update({"inference_graphs": infer_graphs, "inference_unet_graphs": lambda: unet_part(graphed)})
        except Exception as e:   # noqa: BLE001 - a replay or comparison may fail in other ways too
            from sparse_ad.models.graphs import error_text

            results["graphs_error"] = error_text(e)
            print(f"gather_gemm_graphs: {results['graphs_error']}")
    from sparse_ad.models.gather_gemm import DEFAULT_GATHER, GATHER_MODES

    default_gather = DEFAULT_GATHER[dev.type]

    for mode in GATHER_MODES:   # the other ways of gathering rows (`gather_rows`), each engine's whole path
        if mode == default_gather:
            continue
        refs = {"gather_gemm": b, **({"graphs": g} if "inference_graphs" in stages else {})}
        for eng, ref in refs.items():   # each against the same engine with the default gather
            try:   # the first forward of the graphed form captures; a failure must not cost the rest
                net = fuse_for_inference(fused, engine="gather_gemm" if eng == "gather_gemm" else
                                         "gather_gemm_graphs", gather=mode)
                results[f"diff_{eng}@{mode}"] = float((ref.float() - unet_part(net).float()).abs().max())
                stages[f"inference_{eng}@{mode}"] = lambda net=net: (vox_part(), unet_part(net))
            except Exception as e:   # noqa: BLE001
                from sparse_ad.models.graphs import error_chain

                results[f"error_{eng}@{mode}"] = error_chain(e)
                print(f"{eng} with gather={mode}: {results[f'error_{eng}@{mode}']}")
    if cfg.model.test_views > 1:
        stages["inference_views"] = infer_views
    stages["eval_batch"] = eval_batch
    spread = interleaved_ms(dev.type, stages, latency_rounds, warmup=warmup)
    results.update({name: s["median"] for name, s in spread.items()})
    voxels = len(voxelize_batch(one, grid, torch.device("cpu")).keys)
    out = {
        "device": str(dev), "points_per_frame": points, "voxels_per_frame": voxels, "batch_size": batch_size,
        "amp": amp, "model": {"channels": list(cfg.model.channels), "blocks_per_level": cfg.model.blocks_per_level},
        "train_step_ms": results["train_step"], "train_frames_per_s": batch_size / results["train_step"] * 1e3,
        "inference_ms_per_frame": results["inference"],
        "inference_voxelize_ms": results["inference_voxelize"], "inference_unet_ms": results["inference_unet"],
        "inference_unfused_amp_ms_per_frame": results["inference_unfused"],
        "inference_gather_gemm_ms_per_frame": results["inference_gather_gemm"],
        "inference_unet_gather_gemm_ms": results["inference_unet_gather_gemm"],
        "gather_gemm_max_abs_diff": results["gather_gemm_max_abs_diff"],
        "inference_graphs_ms_per_frame": results.get("inference_graphs"),
        "inference_unet_graphs_ms": results.get("inference_unet_graphs"),
        "graphs_max_abs_diff": results.get("graphs_max_abs_diff"), "graphs_error": results.get("graphs_error"),
        "graphs_capture_ms": results.get("graphs_capture_ms"),
        "graphs_vs_gather_gemm_max_abs_diff": results.get("graphs_vs_gather_gemm_max_abs_diff"),   # padded GEMMs
        "gather_default": default_gather,
        "gather_modes_ms_per_frame": {   # whole path per frame, {mode: {engine: ms}}
            mode: {eng: results.get(f"inference_{eng}@{mode}") for eng in ("gather_gemm", "graphs")}
            for mode in GATHER_MODES if mode != default_gather},
        "gather_modes_max_abs_diff": {   # max |dp| from the default mode's probabilities (same engine), or the error
            f"{eng}@{mode}": results.get(f"diff_{eng}@{mode}", results.get(f"error_{eng}@{mode}"))
            for mode in GATHER_MODES if mode != default_gather for eng in ("gather_gemm", "graphs")
            if f"diff_{eng}@{mode}" in results or f"error_{eng}@{mode}" in results},
        "eval_engine": DEFAULT_ENGINE[dev.type],
        "test_views": cfg.model.test_views, "inference_views_ms_per_frame": results.get("inference_views"),
        "eval_ms_per_frame": results["eval_batch"] / batch_size,
        "inference_spread_ms": spread,
        "peak_gpu_memory_mb": peak_mb.get("train"),   # of the training steps
        "peak_inference_gpu_memory_mb": (torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda"
        else None,   # of every inference stage and the eval batch, training's tensors still held
        "repeats": repeats, "latency_rounds": latency_rounds, "machine": machine_info(),
    }
    return out


def bench_reader(root: str, frames: int = 40, config: str | None = None, overrides=()) -> dict:
    """Frames/s of reading a split (npy load + GT join + augmentation) and of CPU
    voxelization of the loaded frames, one process, one frame at a time."""
    from sparse_ad.data.anovox import open_split
    from sparse_ad.data.batch import collate
    from sparse_ad.data.dataset import FrameDataset

    cfg = load_config(config, list(overrides))   # e.g. data.sweeps=3: read as the run would
    refs = open_split(root, cfg.data.sensor).frames[:frames]
    ds = FrameDataset(refs, cfg, train=True)
    ds[0]  # warm the JIT and the page cache of one file
    t0 = time.perf_counter()
    samples = [ds[i] for i in range(len(ds))]
    t_read = time.perf_counter() - t0
    grid = cfg.grid.build()
    voxelize_batch(collate(samples[:1]), grid, torch.device("cpu"))
    t0 = time.perf_counter()
    for s in samples:
        voxelize_batch(collate([s]), grid, torch.device("cpu"))
    t_vox = time.perf_counter() - t0
    pts = float(np.mean([len(s.points) for s in samples]))
    return {"frames": len(samples), "points_per_frame": pts, "read_frames_per_s": len(samples) / t_read,
            "voxelize_frames_per_s": len(samples) / t_vox}


def _p10_p90(r: dict, name: str) -> str:
    s = (r.get("inference_spread_ms") or {}).get(name)
    return f"  (10-90%: {s['p10']:.1f}-{s['p90']:.1f}, {r['latency_rounds']} rounds)" if s else ""


def format_table(r: dict) -> str:
    rows = [("device", r["device"]),
            ("points / voxels per frame", f"{r['points_per_frame']} / {r['voxels_per_frame']}"),
            ("batch size, AMP", f"{r['batch_size']}, {r['amp']}"),
            ("train step (ms, median)", f"{r['train_step_ms']:.1f}"),
            ("training throughput (frames/s)", f"{r['train_frames_per_s']:.1f}"),
            ("inference per frame, spconv (ms, median)", f"{r['inference_ms_per_frame']:.1f}"
             + _p10_p90(r, "inference")),
            ("  voxelize / U-Net (ms)", f"{r['inference_voxelize_ms']:.1f} / {r['inference_unet_ms']:.1f}"),
            ("  unfused SpUNet, autocast (ms)", f"{r['inference_unfused_amp_ms_per_frame']:.1f}"),
            ("  gather_gemm engine: whole / U-Net (ms)",
             f"{r['inference_gather_gemm_ms_per_frame']:.1f} / {r['inference_unet_gather_gemm_ms']:.1f}"
             + _p10_p90(r, "inference_gather_gemm")),
            ("  gather_gemm vs spconv, max |dp|", f"{r['gather_gemm_max_abs_diff']:.1e}"),
            *([("  gather_gemm_graphs: whole / U-Net (ms)",
                f"{r['inference_graphs_ms_per_frame']:.1f} / {r['inference_unet_graphs_ms']:.1f}"
                + _p10_p90(r, "inference_graphs")),
               ("  gather_gemm_graphs vs spconv / vs gather_gemm, max |dp|",
                f"{r['graphs_max_abs_diff']:.1e} / {r.get('graphs_vs_gather_gemm_max_abs_diff') or 0:.1e}"),
               ("  gather_gemm_graphs: first frame's capture (ms)",
                "n/a" if r.get("graphs_capture_ms") is None else f"{r['graphs_capture_ms']:.0f}")]
              if r.get("inference_graphs_ms_per_frame") is not None else []),
            *[(f"  gather={mode}: gather_gemm / graphs, whole (ms)",
               " / ".join("n/a" if ms is None else f"{ms:.1f}" for ms in by.values())
               + "  (max |dp| from the default: " + ", ".join(
                   f"{k.split('@')[0]} {v:.1e}" if isinstance(v, float) else f"{k.split('@')[0]} {v}"
                   for k, v in (r.get("gather_modes_max_abs_diff") or {}).items() if k.endswith(f"@{mode}")) + ")")
              for mode, by in (r.get("gather_modes_ms_per_frame") or {}).items()],
            *([(f"  with {r['test_views']} test views, {r['eval_engine']} (ms)",
                f"{r['inference_views_ms_per_frame']:.1f}")]
              if r.get("inference_views_ms_per_frame") is not None else []),
            (f"eval ({r['eval_engine']}), {r['batch_size']} frames x {r['test_views']} views a pass (ms/frame)",
             f"{r['eval_ms_per_frame']:.1f}"),
            ("peak GPU memory, training (MB)",
             "n/a" if r["peak_gpu_memory_mb"] is None else f"{r['peak_gpu_memory_mb']:.0f}")]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


@reported("bench_model")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="training throughput and inference latency of sparse_ad "
                                "(example: python tools/bench_model.py --config configs/anovox_mono.yaml)")
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--points", type=positive_int, default=120_000)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--repeats", type=positive_int, default=10, help="training steps timed (median)")
    p.add_argument("--latency-rounds", type=positive_int, default=100,
                   help="rounds of the interleaved inference timings (each variant once per round)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", default=None, help="also time reading + voxelizing this split's frames")
    p.add_argument("--out", type=Path, default=Path("runs/bench/model.json"))
    a = p.parse_args(argv)
    # the split first: a wrong --data fails in seconds, not after minutes of GPU timings
    reader = bench_reader(a.data, config=a.config, overrides=a.overrides) if a.data else None
    r = bench_model(a.config, a.overrides, a.points, a.batch_size, a.repeats, device=a.device,
                    latency_rounds=a.latency_rounds)
    print(format_table(r))
    if reader:
        r["reader"] = rd = reader
        print(f"reader: {rd['read_frames_per_s']:.1f} frames/s read+label+augment, "
              f"{rd['voxelize_frames_per_s']:.1f} frames/s voxelize (CPU, one process, "
              f"{rd['points_per_frame']:.0f} points/frame)")
    atomic_write_text(a.out, json.dumps(r, indent=2))
    print(f"wrote {a.out}")
    return 0
