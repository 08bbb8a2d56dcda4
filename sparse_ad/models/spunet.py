"""A small sparse U-Net on spconv: one anomaly logit per input voxel, optionally one per frame.

Level s works at stride 2**s with `widths[s]` channels, `widths = (base_channels, *channels)`.
Submanifold convs of level s share `indice_key=f"subm{s}"` (their kernel maps are built once);
the stride-2 down conv into level s is keyed `f"spconv{s}"` and the inverse conv back out of
it reuses that key, so the decoder lands exactly on the encoder's voxels, in the same row order.

Conv algorithm: spconv reads each conv's `.algo` attribute at call time, and since spconv 2.2
the weight layout no longer depends on it (KRSC for every algorithm). So the model does not
fix the algorithm at construction: `forward` sets `.algo` on every conv from the input's
device (`conv_algo`, Native on CPU, implicit GEMM on CUDA), only when it changes. Layers that
share an indice key therefore always agree on the algorithm, as spconv requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import spconv.pytorch as spconv
import torch
from spconv.constants import ALL_WEIGHT_IS_KRSC
from spconv.pytorch.conv import SparseConvolution
from torch import nn

from sparse_ad.config import ModelConfig
from sparse_ad.errors import ConfigError, SparseADError
from sparse_ad.grid import VoxelGrid
from sparse_ad.models.sparse_tensor import conv_algo
from sparse_ad.voxelize.result import Voxels

if not ALL_WEIGHT_IS_KRSC:  # spconv < 2.2 tied the weight layout to the algorithm
    raise ImportError("sparse_ad needs spconv >= 2.2 (one weight layout for every conv algorithm)")

VOXEL_FEATURES = ("intensity", "log1p_count", "offset_x", "offset_y", "offset_z", "height")
SWEEP_FEATURE = "sweep_lag"   # appended when data.sweeps > 1 (data/sweeps.py)


def input_features(sweeps: int) -> tuple[str, ...]:
    """Names of the model's input channels, in order, for `data.sweeps` = sweeps."""
    return VOXEL_FEATURES + ((SWEEP_FEATURE,) if sweeps > 1 else ())


def check_features(x, in_channels: int) -> None:
    """The sparse tensor `x` carries the feature channels the model was built for (every
    engine's forward checks it: a wrong count would otherwise fail deep inside a GEMM)."""
    if x.features.shape[1] != in_channels:
        raise SparseADError(f"model input: expected {in_channels} feature channels, "
                            f"found {x.features.shape[1]} (model.in_channels in the config)")


def check_input_channels(in_channels: int, sweeps: int) -> None:
    """model.in_channels must match what the data gives; say which value does."""
    names = input_features(sweeps)
    if in_channels != len(names):
        raise ConfigError(f"model.in_channels is {in_channels} but data.sweeps={sweeps} gives {len(names)} input "
                          f"features ({', '.join(names)}); set model.in_channels={len(names)}")


@dataclass
class SpUNetOutput:
    voxel_logits: torch.Tensor          # (M,) anomaly logit per input row, in input order
    scene_logits: torch.Tensor | None   # (B,) anomaly logit per frame, None without a scene head


def _bn(c: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(c, eps=1e-3, momentum=0.01)


class ResidualBlock(spconv.SparseModule):
    """Two 3x3x3 submanifold convs (BN, ReLU) plus identity, or a 1x1x1 projection when the
    width changes (the decoder's first block, fed the concatenated skip)."""

    def __init__(self, cin: int, cout: int, key: str):
        super().__init__()
        self.conv1 = spconv.SubMConv3d(cin, cout, 3, padding=1, bias=False, indice_key=key)
        self.bn1 = _bn(cout)
        self.conv2 = spconv.SubMConv3d(cout, cout, 3, padding=1, bias=False, indice_key=key)
        self.bn2 = _bn(cout)
        self.proj = None if cin == cout else spconv.SparseSequential(
            spconv.SubMConv3d(cin, cout, 1, bias=False), _bn(cout))

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        y = self.conv1(x)
        y = self.conv2(y.replace_feature(torch.relu(self.bn1(y.features))))
        skip = x.features if self.proj is None else self.proj(x).features
        return y.replace_feature(torch.relu(self.bn2(y.features) + skip))


def _blocks(cin: int, cout: int, n: int, key: str) -> spconv.SparseSequential:
    return spconv.SparseSequential(*[ResidualBlock(cin if i == 0 else cout, cout, key) for i in range(n)])


class SpUNet(nn.Module):
    def __init__(self, in_channels: int, base_channels: int = 32, channels=(32, 64, 128, 256),
                 blocks_per_level: int = 2, scene_head: bool = False, head_prior: float = 0.01):
        super().__init__()
        self.in_channels = in_channels
        w = (base_channels, *channels)
        n = blocks_per_level
        self.stem = spconv.SparseSequential(
            spconv.SubMConv3d(in_channels, w[0], 3, padding=1, bias=False, indice_key="subm0"),
            _bn(w[0]), nn.ReLU())
        self.enc0 = _blocks(w[0], w[0], n, "subm0")
        self.down, self.enc, self.up, self.dec = (nn.ModuleList() for _ in range(4))
        for s in range(1, len(w)):
            self.down.append(spconv.SparseSequential(
                spconv.SparseConv3d(w[s - 1], w[s], 2, stride=2, bias=False, indice_key=f"spconv{s}"),
                _bn(w[s]), nn.ReLU()))
            self.enc.append(_blocks(w[s], w[s], n, f"subm{s}"))
            self.up.append(spconv.SparseSequential(
                spconv.SparseInverseConv3d(w[s], w[s - 1], 2, bias=False, indice_key=f"spconv{s}"),
                _bn(w[s - 1]), nn.ReLU()))
            self.dec.append(_blocks(2 * w[s - 1], w[s - 1], n, f"subm{s - 1}"))
        self.head = nn.Linear(w[0], 1)
        # RetinaNet prior: start every voxel at P(anomaly) = head_prior so that the rare class
        # does not face a flood of confident-wrong negatives in the first steps.
        nn.init.constant_(self.head.bias, -math.log((1 - head_prior) / head_prior))
        # Scene head pools the final full-resolution features: max pooling keeps a small
        # anomaly visible that the coarse bottleneck would average away.
        self.scene = nn.Sequential(nn.Linear(2 * w[0], w[0]), nn.ReLU(), nn.Linear(w[0], 1)) if scene_head else None
        self._algo = None

    @property
    def stride(self) -> int:
        """Total downsampling factor of the bottleneck."""
        return 2 ** len(self.down)

    def forward(self, x: spconv.SparseConvTensor) -> SpUNetOutput:
        check_features(x, self.in_channels)
        self._use_algo(conv_algo(x.features.device))
        # A stride-2 conv drops the last voxel of an odd-sized axis, so widen the box (not the
        # indices) to a multiple of the total stride: 1000 -> 1008 on AnoVox x/y.
        x = spconv.SparseConvTensor(x.features, x.indices, padded_shape(x.spatial_shape, self.stride),
                                    x.batch_size)
        x = self.enc0(self.stem(x))
        skips = []
        for down, enc in zip(self.down, self.enc, strict=True):
            skips.append(x)
            x = enc(down(x))
        for up, dec in zip(reversed(self.up), reversed(self.dec), strict=True):
            x = up(x)  # rows of x now match the skip's rows (same indice key)
            x = dec(x.replace_feature(torch.cat([x.features, skips.pop().features], dim=1)))
        return heads(self.head, self.scene, x.features, x.indices[:, 0], x.batch_size)   # input row order

    def _use_algo(self, algo) -> None:
        if algo != self._algo:
            for m in self.modules():
                if isinstance(m, SparseConvolution):
                    m.algo = algo
            self._algo = algo


def heads(head: nn.Module, scene: nn.Module | None, feats: torch.Tensor, batch_index: torch.Tensor,
          batch_size: int) -> SpUNetOutput:
    """The voxel head on the final features (M, w0) and the optional scene head on their
    per-frame pooling; logits in float32 whatever the features' dtype (fp16 under autocast or
    in a folded fp16 model: the losses and metrics work in float32 anyway)."""
    voxel_logits = head(feats).squeeze(1).float()                                  # (M,)
    scene_logits = None
    if scene is not None:
        pooled = pool_per_frame(feats, batch_index.long(), batch_size)             # (B, 2*w0)
        scene_logits = scene(pooled).squeeze(1).float()                            # (B,)
    return SpUNetOutput(voxel_logits, scene_logits)


def padded_shape(shape, multiple: int) -> list[int]:
    return [int(math.ceil(int(s) / multiple) * multiple) for s in shape]


def pool_per_frame(feats: torch.Tensor, batch_index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Global max and mean per batch element: (M, C) → (B, 2C) in the features' dtype; an
    empty frame pools to 0. scatter_reduce keeps it on the device (no bincount, no host
    sync). It sums in float32 whatever the features' dtype: an fp16 sum of ~24k voxels stalls
    far below the true value on a GPU, and of ~35k of values near 2 overflows to inf."""
    f = feats.float()
    idx = batch_index.unsqueeze(1).expand_as(f)
    out = f.new_zeros(batch_size, f.shape[1])
    mx = out.scatter_reduce(0, idx, f, "amax", include_self=False)
    mean = out.scatter_reduce(0, idx, f, "mean", include_self=False)
    return torch.cat([mx, mean], dim=1).to(feats.dtype)


def build_model(cfg: ModelConfig) -> SpUNet:
    if cfg.in_channels < 1 or cfg.base_channels < 1 or not cfg.channels or min(cfg.channels) < 1:
        raise ConfigError(f"model: channel counts must be positive, found in_channels={cfg.in_channels}, "
                          f"base_channels={cfg.base_channels}, channels={cfg.channels}")
    if cfg.blocks_per_level < 1:
        raise ConfigError(f"model.blocks_per_level: expected >= 1, found {cfg.blocks_per_level}")
    if not 0.0 < cfg.head_prior < 1.0:
        raise ConfigError(f"model.head_prior: expected a probability in (0, 1), found {cfg.head_prior}")
    return SpUNet(cfg.in_channels, cfg.base_channels, tuple(cfg.channels), cfg.blocks_per_level,
                  cfg.scene_head, cfg.head_prior)


def voxel_features(vox: Voxels, grid: VoxelGrid, columns: int = 1):
    """Model input per voxel, (M, 6 + columns - 1) float32 in `input_features` order: mean
    intensity (first extra point column, 0 if none), log1p(points), mean offset from the voxel
    centre in voxel units (each in [-0.5, 0.5]), height (iz + 0.5) / nz mapped to [-1, 1], then
    the means of the point columns after intensity among the first `columns` (the sweep lag
    when data.sweeps > 1). Later feature columns (e.g. label columns) are not model input.

    Same array type out as in: numpy for CPU voxels, torch (same device) for GPU voxels.
    """
    m, nz = len(vox), grid.shape[2]
    f = vox.features
    has_f = f.ndim == 2 and f.shape[1] > 0
    if isinstance(vox.counts, np.ndarray):
        intensity = f[:, :1] if has_f else np.zeros((m, 1), np.float32)
        height = (vox.coords[:, 2:3].astype(np.float32) + 0.5) / nz * 2 - 1
        cols = [intensity, np.log1p(vox.counts.astype(np.float32))[:, None], vox.offsets / grid.resolution, height,
                f[:, 1:columns]]
        return np.concatenate([np.asarray(c, np.float32) for c in cols], axis=1)
    intensity = f[:, :1] if has_f else f.new_zeros((m, 1))
    height = (vox.coords[:, 2:3].float() + 0.5) / nz * 2 - 1
    cols = [intensity, torch.log1p(vox.counts.float())[:, None], vox.offsets / grid.resolution, height,
            f[:, 1:columns]]
    return torch.cat([c.float() for c in cols], dim=1)
