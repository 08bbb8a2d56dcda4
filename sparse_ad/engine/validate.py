"""Validation during training: unaugmented held-out frames through the AnoVox protocol.

The threshold is calibrated here (best F1 on validation) and stored in the checkpoint; the
collapse alarm looks at the model's own decision threshold (p = 0.5) as well, because a
calibrated threshold always finds *some* recall and would hide a collapsed model.
"""

from __future__ import annotations

import numpy as np
import torch

from sparse_ad.engine.protocol import ProtocolAccumulator

DECISION_THRESHOLD = 0.5


@torch.no_grad()
def frame_scores(model, vb, rt) -> torch.Tensor:
    """Anomaly probability (M,) float32 for every voxel of a VoxelBatch."""
    from sparse_ad.models.sparse_tensor import to_sparse_tensor

    x = to_sparse_tensor(vb.features, vb.coords, vb.batch_index, rt.grid.shape, vb.batch_size)
    with torch.autocast(rt.device.type, enabled=rt.amp, dtype=torch.float16):
        out = model(x)
    return torch.sigmoid(out.voxel_logits.float())


@torch.no_grad()
def validate(cfg, rt, model, epoch: int) -> dict:
    from torch.utils.data import DataLoader

    from sparse_ad.data.batch import collate, voxelize_batch

    model.eval()
    acc = ProtocolAccumulator()
    loader = DataLoader(rt.val_set, batch_size=cfg.train.batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers, collate_fn=collate)
    for batch in loader:
        rt.note_batch(batch)
        if len(batch) == 0:
            continue
        vb = voxelize_batch(batch, rt.grid, rt.device)
        scores = frame_scores(model, vb, rt).cpu().numpy()
        valid, targets = vb.valid.cpu().numpy(), vb.targets.cpu().numpy() > 0
        for b in range(vb.batch_size):
            rows = slice(vb.offsets[b], vb.offsets[b + 1])
            keep = valid[rows]
            acc.add_frame(scores[rows][keep], targets[rows][keep])
    model.train()
    threshold = acc.all.best_f1_threshold()
    metrics = acc.result(threshold)
    at_decision = acc.all.compute(DECISION_THRESHOLD).to_dict()
    metrics["at_decision_threshold"] = {k: at_decision[k] for k in ("recall", "detections", "positive_rate")}
    metrics["collapse"] = collapse_reason(metrics)
    return metrics


def collapse_reason(metrics: dict) -> str | None:
    """Why the model looks collapsed, or None. Only meaningful when validation has anomalies."""
    na = metrics["normality_included"]
    if not na.get("anomaly_voxels"):
        return None
    dec = metrics["at_decision_threshold"]
    if dec["detections"] == 0 or dec["positive_rate"] == 0:
        return (f"validation holds {na['anomaly_voxels']} anomaly voxels but at p=0.5 the model detects none "
                f"(recall {dec['recall']:.3f}, positive rate {dec['positive_rate']:.2e}): it predicts 'normal' "
                "everywhere — check the loss (loss.kind=focal), the labels (check-alignment) and the lr")
    auroc = metrics["anomalies_only"].get("auroc")
    if auroc is not None and not np.isnan(auroc) and auroc <= 0.5:
        return f"anomalies-only AUROC {auroc:.3f} ≤ 0.5: scores do not rank anomalies above normal voxels"
    return None
