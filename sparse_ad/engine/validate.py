"""Validation during training: unaugmented held-out frames through the AnoVox protocol.

The threshold is calibrated here (best F1 on validation) and stored in the checkpoint. The
collapse alarm (`collapse_reason`) watches whether the scores rank anomalies at all: a
constant output would still "calibrate" a threshold that detects something.
"""

from __future__ import annotations

import numpy as np
import torch

from sparse_ad.engine.protocol import ProtocolAccumulator

DECISION_THRESHOLD = 0.5


@torch.no_grad()
def frame_scores(model, vb, grid, amp: bool, views: int = 1) -> torch.Tensor:
    """Anomaly probability (M,) float32 for every voxel of a VoxelBatch (on its device).

    `model` is a SpUNet (autocast when `amp`) or a folded inference model (either engine),
    which carries its own dtype (in eval mode autocast does not reach spconv's convs anyway).
    The voxelizer's coordinates are in range by construction, so the range check (a host
    sync) is skipped. `views` > 1 averages the probabilities of that many mirrored copies
    (`sparse_ad.models.tta`), run as one batch of `views` x B frames: one forward pass, so the
    per-call costs are paid once."""
    from sparse_ad.models.inference import is_inference_model
    from sparse_ad.models.sparse_tensor import to_sparse_tensor
    from sparse_ad.models.tta import stacked_views

    features, coords, batch_index, n = stacked_views(vb.features, vb.coords, vb.batch_index, vb.batch_size,
                                                     grid.shape, views)
    x = to_sparse_tensor(features, coords, batch_index, grid.shape, n, check_range=False)
    amp = amp and not is_inference_model(model)
    with torch.autocast(vb.features.device.type, enabled=amp, dtype=torch.float16):
        out = model(x)
    return torch.sigmoid(out.voxel_logits.float()).view(views, -1).mean(0)


def scored_batches(model, dataset, cfg, grid, device: torch.device, amp: bool):
    """(batch, VoxelBatch, scores (M,) numpy) per batch of `dataset`, in order: `train.batch_size`
    frames (x test views) per forward pass, loaded by `data.num_workers` processes meanwhile
    (how validation, `eval` and `predict` score). Batches whose frames all failed to load
    come as (batch, None, None); `batch.skipped` names the failures."""
    from torch.utils.data import DataLoader

    from sparse_ad.data.batch import collate, voxelize_batch
    from sparse_ad.engine.runtime import loader_worker_init

    loader = DataLoader(dataset, batch_size=max(1, cfg.train.batch_size), shuffle=False,
                        num_workers=cfg.data.num_workers, collate_fn=collate, worker_init_fn=loader_worker_init())
    for batch in loader:
        if len(batch) == 0:
            yield batch, None, None
            continue
        vb = voxelize_batch(batch, grid, device)
        if len(vb.features) == 0:   # no frame has a point inside the grid: nothing to score (or to run)
            yield batch, vb, np.zeros(0, np.float32)
            continue
        yield batch, vb, frame_scores(model, vb, grid, amp, views=cfg.model.test_views).cpu().numpy()


@torch.no_grad()
def validate(cfg, rt, model, epoch: int) -> dict | None:
    """Validation metrics on rank 0 (None on the other ranks). Under DDP every rank scores
    an interleaved share of the frames with rank 0's weights and BN statistics, and rank 0
    pools them in frame order, so the metrics are those of one process scoring them all."""
    from torch.utils.data import Subset

    model.eval()
    dataset = rt.val_set
    if rt.distributed:
        _weights_from_rank0(model)   # BN statistics differ between ranks after a DDP step
        dataset = Subset(dataset, range(rt.rank, len(dataset), rt.world_size))
    scorer = validation_scorer(model, rt.device)
    acc = ProtocolAccumulator()
    frames = []   # under DDP: this rank's (frame index, scores, is-anomaly, name), pooled on rank 0
    for batch, vb, scores in scored_batches(scorer, dataset, cfg, rt.grid, rt.device, rt.amp):
        rt.note_batch(batch)
        if vb is None:
            continue
        valid, targets = vb.valid.cpu().numpy(), vb.targets.cpu().numpy() > 0
        for b, index in enumerate(batch.indices):
            rows = slice(vb.offsets[b], vb.offsets[b + 1])
            keep = valid[rows]
            # "anomalies only": the current sweep hits an anomaly voxel (earlier sweeps' points may
            # land on one it misses), as eval and eval-preds decide it
            scored = (scores[rows][keep], targets[rows][keep], batch.current_sees_anomaly[b])
            if rt.distributed:
                frames.append((index, *scored, vb.names[b]))
            else:
                acc.add_frame(*scored[:2], name=vb.names[b], anomaly_frame=scored[2])
    model.train()
    if rt.distributed:
        shares = [None] * rt.world_size if rt.is_main else None
        torch.distributed.gather_object(frames, shares, dst=0)
        if not rt.is_main:
            return None
        for _, scores, targets, seen, name in sorted((f for share in shares for f in share), key=lambda f: f[0]):
            acc.add_frame(scores, targets, name=name, anomaly_frame=seen)
    threshold = acc.all.best_f1_threshold()
    metrics = acc.result(threshold)
    metrics["objects"].pop("worst", None)   # per-epoch history keeps the counts, not the list
    at_decision = acc.all.compute(DECISION_THRESHOLD).to_dict()
    metrics["at_decision_threshold"] = {k: at_decision[k] for k in ("recall", "detections", "positive_rate")}
    metrics["collapse"] = collapse_reason(metrics)
    return metrics


def _weights_from_rank0(model) -> None:
    """Rank 0's parameters and buffers on every rank, in place."""
    for t in model.state_dict().values():
        torch.distributed.broadcast(t, src=0)


def validation_scorer(model, device: torch.device):
    """What validation scores with. On CUDA: the ops `eval` and `predict` run there — BN
    folded, real fp16, gather + GEMM (`fuse_for_inference`) — so the stored threshold is
    calibrated on the numerics it will be applied to, at well under the latency of the
    unfolded model under autocast (whose eval-mode convs run in fp32; README). Eagerly, not
    replayed from CUDA graphs as `eval` does by default: the scorer is folded anew every epoch,
    so each capture (58-114 ms on an H100) would be replayed only a few times. The graphs run
    the same ops on padded row counts, so cuBLAS may pick other GEMM kernels: probabilities
    differ by fp16 rounding (H100: graphs and eager equally far from spconv, 1.6e-3 and 1.7e-3
    at most), and eval's metrics were the same to the last digit. On CPU the unfolded model itself: the
    folded fp32 one scores within ~1e-6 of it, and keeping it lets CPU runs reproduce recorded
    histories bit for bit."""
    if device.type != "cuda":
        return model
    from sparse_ad.models.inference import fuse_for_inference

    return fuse_for_inference(model, half=True, engine="gather_gemm")


def collapse_reason(metrics: dict) -> str | None:
    """Why the model looks collapsed, or None. Only meaningful when validation has anomalies.

    The sign is the ranking: AUROC <= 0.55, or AUPR within 2x of the anomaly share (chance),
    i.e. the scores do not put anomalies above normal voxels — a constant output, or "normal
    everywhere" with noise. What the calibrated threshold detects cannot show it: that
    threshold is one of the anomaly voxels' own scores (best F1), so it always detects one.
    Nor can p = 0.5 (reported as `at_decision_threshold`): focal-loss probabilities are not
    calibrated there, and the healthy demo run detects nothing at 0.5 for its first 6 epochs.
    """
    na = metrics["normality_included"]
    if not na.get("anomaly_voxels"):
        return None
    chance = na["anomaly_voxels"] / max(na["voxels"], 1)
    auroc, aupr = na.get("auroc"), na.get("aupr")
    if auroc is not None and (auroc <= 0.55 or aupr <= 2 * chance):
        return (f"the scores rank anomalies no better than chance (AUROC {auroc:.3f}, AUPR {aupr:.4f} vs chance "
                f"{chance:.4f}): the model has collapsed — check the loss (loss.kind=focal), the labels "
                "(check-alignment) and the lr")
    return None
