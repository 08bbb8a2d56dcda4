"""Exponential moving average of the model's weights: what validation scores and what the
checkpoints export when `train.ema_decay` > 0.

With a few dozen anomalies per split, the validation AUPR of the raw weights swings by a
factor of two from one epoch to the next (one bad step re-ranks a handful of objects); the
average over the last ~1 / (1 - decay) steps (fewer in short runs, see `update`) moves
smoothly, so best.pt is picked on a steadier curve and generalizes better. BatchNorm
statistics are averaged like the weights.
"""

from __future__ import annotations

import copy

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based). The decay ramps up
        as (1 + s) / (10 + s) so the average is not dominated by the random initialization;
        that ramp reaches 0.99 only at step 890, so in shorter runs it alone sets the decay:
        the average then weights step k about as k^8, i.e. half its weight lies on the last
        ~7% of the steps (the demo's 540 steps: about its last epoch), whatever `decay` >= 0.984."""
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for avg, cur in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if avg.dtype.is_floating_point:
                avg.lerp_(cur.detach(), 1.0 - d)
            else:
                avg.copy_(cur)
