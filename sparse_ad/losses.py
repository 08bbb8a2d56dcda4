"""Losses for ~0.1 % anomaly voxels: class-balanced focal (or weighted BCE), plus frame-level
and multiple-instance (MIL) supervision.

Every voxel term is a weighted mean: sum_i w_i * l_i / sum_i w_i over valid (non-ignored)
voxels, w_i the weight of the voxel's class (torch's `CrossEntropyLoss(weight=...)`
convention). Dividing by the summed weights, not the count, keeps the loss O(1) whatever the
scale of the weights and the class mix of the batch. With no valid voxel the sum is an exact
0 that still hangs on the graph, so `backward()` runs and gives zero gradients, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from sparse_ad.config import LossConfig
from sparse_ad.errors import ConfigError

if TYPE_CHECKING:  # the loss only reads two fields; importing spconv here would cost seconds
    from sparse_ad.models.spunet import SpUNetOutput

KINDS = ("focal", "bce")
SUPERVISIONS = ("voxel", "scene", "mil")


@dataclass
class Targets:
    voxel_targets: torch.Tensor   # (M,) float 1 anomaly / 0 normal (any value where not valid)
    valid: torch.Tensor           # (M,) bool: voxel is scored (in GT, not ignored)
    batch_index: torch.Tensor     # (M,) int frame of each voxel, in [0, B)
    frame_labels: torch.Tensor    # (B,) float 1 iff the frame's LiDAR hits anomaly voxels of its GT


def class_balanced_weights(counts: Sequence[int], beta: float) -> torch.Tensor:
    """(2,) float32 [w_normal, w_anomaly] from the effective number of samples (Cui et al. 2019):
    w_c ∝ (1 - β) / (1 - β^n_c), normalized so the weights sum to the number of classes (2).

    β = 0 gives equal weights, β → 1 inverse class frequency. A class with no sample is counted
    as one (its weight then only matters if it ever appears).
    """
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"loss.beta: expected a value in [0, 1), found {beta}")
    n = np.maximum(np.asarray(counts, dtype=np.float64).reshape(-1), 1.0)
    if n.shape != (2,):
        raise ConfigError(f"class counts: expected 2 values (normal, anomaly), found {len(n)}")
    # 1 - β^n computed as -expm1(n log β): exact for β close to 1 and for huge n.
    effective = -np.expm1(n * np.log(beta)) / (1.0 - beta) if beta > 0 else np.ones(2)
    w = 1.0 / effective
    return torch.tensor(w * len(w) / w.sum(), dtype=torch.float32)


def _elementwise(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Focal binary cross-entropy per element (gamma = 0: plain BCE), from log-sigmoids so that
    large |logits| neither overflow nor lose precision."""
    ce = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits))
    if gamma == 0:
        return ce
    one_minus_pt = targets * torch.sigmoid(-logits) + (1 - targets) * torch.sigmoid(logits)
    # clamp: d(u^γ)/du is infinite at u = 0 for γ < 1 (a saturated sigmoid), which backward
    # would turn into NaN; the clamped elements get a zero gradient instead.
    return one_minus_pt.clamp_min(1e-30).pow(gamma) * ce


def weighted_voxel_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                        class_weights: torch.Tensor, gamma: float) -> torch.Tensor:
    """sum w_i l_i / sum w_i over valid voxels; logits (M,), targets (M,), valid (M,) bool,
    class_weights (2,) [normal, anomaly]. Ignored logits are replaced before any math, so they
    get exactly zero gradient even when they are inf or NaN."""
    logits = torch.where(valid, logits.float(), torch.zeros((), device=logits.device))
    targets = torch.where(valid, targets.float(), torch.zeros((), device=logits.device))
    cw = class_weights.to(logits.device)
    w = torch.where(valid, cw[0] + (cw[1] - cw[0]) * targets, torch.zeros((), device=logits.device))
    return (w * _elementwise(logits, targets, gamma)).sum() / w.sum().clamp_min(1e-12)


def focal_loss(logits, targets, valid, class_weights, gamma: float = 2.0) -> torch.Tensor:
    """Class-balanced binary focal loss: w_c (1 - p_t)^γ BCE, weighted mean over valid voxels."""
    return weighted_voxel_loss(logits, targets, valid, class_weights, gamma)


def bce_loss(logits, targets, valid, pos_weight: float = 1.0) -> torch.Tensor:
    """BCE with anomalies weighted `pos_weight`, weighted mean over valid voxels (unlike torch's
    `pos_weight`, which divides by the count)."""
    return weighted_voxel_loss(logits, targets, valid, torch.tensor([1.0, float(pos_weight)]), 0.0)


def scene_loss(scene_logits: torch.Tensor, frame_labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """Frame-level term, mean over frames: (B,) logits vs (B,) labels."""
    return _elementwise(scene_logits.float(), frame_labels.float(), gamma).mean()


def mil_loss(logits: torch.Tensor, t: Targets, gamma: float) -> torch.Tensor:
    """Multiple-instance loss from frame labels only. An anomalous frame is a bag that must hold
    one high voxel: its largest valid logit is pushed to 1. In a normal frame every valid voxel
    is pushed to 0. Each part is a mean over its own members, and the two are added, so the few
    bags are not drowned by the many normal voxels."""
    b = t.batch_index.long()
    n_frames = t.frame_labels.shape[0]
    x = torch.where(t.valid, logits.float(), torch.full((), -torch.inf, device=logits.device))
    bag_max = x.new_full((n_frames,), -torch.inf).scatter_reduce(0, b, x, "amax")   # (B,)
    bags = (t.frame_labels > 0.5) & torch.isfinite(bag_max)                         # (B,)
    bag_term = _elementwise(torch.where(bags, bag_max, 0.0), torch.ones_like(bag_max), gamma)
    bag_loss = torch.where(bags, bag_term, 0.0).sum() / bags.sum().clamp_min(1)
    normal_voxels = t.valid & (t.frame_labels[b] <= 0.5)
    normal_loss = weighted_voxel_loss(logits, torch.zeros_like(logits), normal_voxels,
                                      torch.ones(2), gamma)
    return bag_loss + normal_loss


@dataclass
class AnomalyLoss:
    """`loss(output, targets) -> (total, parts)`; parts are floats for logging (one host sync).

    supervision "voxel": dense voxel labels; "mil": frame labels only, through the voxel logits;
    "scene": dense voxel labels plus the frame-level term, and a scene head is required. The
    frame-level term (× scene_weight) is added in every mode whenever the model has a scene
    head, so no parameter is left without a gradient (DDP needs that).
    """

    kind: str
    supervision: str
    gamma: float
    class_weights: torch.Tensor   # (2,) [normal, anomaly] for the voxel term
    scene_weight: float = 1.0

    def weight_note(self) -> str:
        """How much an anomaly voxel counts against a normal one in the voxel term, for the log:
        class-balanced weights depend on the split's counts, not only on β (README)."""
        if self.supervision == "mil":
            return ""
        w = self.class_weights
        return f"; an anomaly voxel weighs {float(w[1] / w[0]):.1f}x a normal one in the loss"

    def __call__(self, output: SpUNetOutput, t: Targets) -> tuple[torch.Tensor, dict[str, float]]:
        if self.class_weights.device != output.voxel_logits.device:  # move once, not every step
            self.class_weights = self.class_weights.to(output.voxel_logits.device)
        if self.supervision == "mil":
            voxel = mil_loss(output.voxel_logits, t, self.gamma)
        else:
            voxel = weighted_voxel_loss(output.voxel_logits, t.voxel_targets, t.valid,
                                        self.class_weights, self.gamma)
        total, parts = voxel, {"voxel": voxel}
        if output.scene_logits is not None:
            parts["scene"] = scene_loss(output.scene_logits, t.frame_labels, self.gamma)
            total = total + self.scene_weight * parts["scene"]
        elif self.supervision == "scene":
            raise ConfigError("loss.supervision=scene needs a scene head: set model.scene_head=true")
        parts["total"] = total
        values = torch.stack([v.detach().float() for v in parts.values()]).tolist()  # one sync
        return total, dict(zip(parts, values, strict=True))


def build_loss(cfg: LossConfig, class_counts: Sequence[int] | None = None) -> AnomalyLoss:
    """class_counts: (normal, anomaly) valid voxels over the training split; needed for
    kind=focal (class-balanced weights), unused by kind=bce (weights 1 and pos_weight) and by
    supervision=mil (which balances bags against normal voxels by averaging each apart, so
    neither class weights nor pos_weight apply there)."""
    if cfg.kind not in KINDS:
        raise ConfigError(f"loss.kind: expected one of {', '.join(KINDS)}, found {cfg.kind!r}")
    if cfg.supervision not in SUPERVISIONS:
        raise ConfigError(f"loss.supervision: expected one of {', '.join(SUPERVISIONS)}, "
                          f"found {cfg.supervision!r}")
    if cfg.kind == "focal":
        if class_counts is None and cfg.supervision != "mil":
            raise ConfigError("loss.kind=focal needs the class counts of the training split")
        weights = torch.ones(2) if cfg.supervision == "mil" else class_balanced_weights(class_counts, cfg.beta)
        gamma = cfg.gamma
    else:
        weights, gamma = torch.tensor([1.0, float(cfg.pos_weight)]), 0.0
    return AnomalyLoss(cfg.kind, cfg.supervision, gamma, weights, cfg.scene_weight)
