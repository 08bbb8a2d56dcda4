"""The inference U-Net's sparse convolutions as gather + one dense GEMM each, in plain torch.

Why: on a GPU, one frame's U-Net is bound by the host, not the device — spconv spends
~0.13 ms of Python/C++ per conv call and syncs 13 times per forward, while the kernels
themselves take ~1.6 ms (README, H100 profile). Here every kernel map is built once per
level with a handful of torch ops, and a conv is four launches:

    rows of the input (plus one zero row) gathered by the map  →  (N, taps * C_in)
    addmm with the folded weight (taps * C_in, C_out) and bias  →  ReLU in place

Maps, for voxel rows `[b, x, y, z]` on a level whose box is `shape`:

* submanifold 3x3x3 (`subm_map`): for each row and each of the 27 offsets d = k - 1 the row
  of the voxel at (x, y, z) + d, or N (the zero row) where there is none or it lies outside
  the box. Built by sorting the level's linear keys once and one `searchsorted` of all N * 27
  neighbour keys: no host sync.
* stride-2 2x2x2 down (`down_map`): a coarse voxel per occupied 2x2x2 cell (`torch.unique`,
  the one host sync of a level), each fine row's parent and its tap k = 4 (x & 1) + 2 (y & 1)
  + (z & 1); the down conv gathers a (N_coarse, 8) table of fine rows.
* the inverse conv back up reuses the same map: one GEMM of the coarse rows against all 8
  taps' weights, then each fine row picks (parent, tap).

Conventions checked against spconv (tests/test_gather_gemm.py): weights are KRSC, (out, kx,
ky, kz, in), tap k = (kx, ky, kz) in row-major order; a submanifold tap reads the input at
(x, y, z) + (k - 1); a stride-2 tap reads the fine voxel 2 * o + k; the inverse conv writes
fine voxel 2 * o + k with the weight of tap k. Coarse levels are kept in key order (spconv
keeps its own order), so only the full-resolution output rows are comparable — and they are
the input's rows, as with spconv.

The zero-row trick costs FLOPs for absent neighbours (a LiDAR voxel has ~5-10 of 26), which a
GPU's tensor cores do not notice; on a CPU, spconv's pair lists do less arithmetic. Memory:
the gathered matrix is N * 27 * C_in values; `max_gather_mb` splits it into row chunks.
"""

from __future__ import annotations

import itertools

import torch
from spconv.constants import FILTER_HWIO
from torch import nn

from sparse_ad.errors import SparseADError
from sparse_ad.models.inference import FusedBlock, FusedConv, InferenceUNet
from sparse_ad.models.spunet import SpUNetOutput, padded_shape, pool_per_frame

_TAPS27 = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), dtype=torch.int64)   # (27, 3), k = 9kx+3ky+kz


def _keys(b: torch.Tensor, xyz: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Linear key of (batch, x, y, z) in a box of `shape` (int64, order = (b, x, y, z))."""
    sx, sy, sz = shape
    return ((b * sx + xyz[..., 0]) * sy + xyz[..., 1]) * sz + xyz[..., 2]


def subm_map(idx: torch.Tensor, shape) -> torch.Tensor:
    """(N, 27) int64: row of the neighbour at each 3x3x3 tap, N where there is none."""
    n = idx.shape[0]
    b, xyz = idx[:, 0], idx[:, 1:]
    sorted_keys, order = torch.sort(_keys(b, xyz, shape))
    q = xyz[:, None, :] + _TAPS27.to(idx.device)[None]                        # (N, 27, 3)
    inside = ((q >= 0) & (q < torch.tensor(shape, device=idx.device))).all(dim=2)
    qk = _keys(b[:, None], q, shape)
    pos = torch.searchsorted(sorted_keys, qk).clamp_(max=n - 1)
    hit = inside & (sorted_keys[pos] == qk)
    return torch.where(hit, order[pos], torch.full_like(pos, n))


class DownMap:
    """The 2x2x2 / stride-2 map from a level (rows `idx`, box `shape`) to the next one."""

    def __init__(self, idx: torch.Tensor, shape):
        if any(s % 2 for s in shape):
            raise SparseADError(f"gather_gemm: level box {tuple(shape)} is not even; pad the spatial shape")
        n = idx.shape[0]
        self.shape = tuple(s // 2 for s in shape)
        half = idx[:, 1:] // 2
        keys, parent = torch.unique(_keys(idx[:, 0], half, self.shape), return_inverse=True)   # host sync
        self.n_coarse = keys.shape[0]
        self.parent = parent                                                     # (N,) coarse row
        odd = idx[:, 1:] & 1
        tap = odd[:, 0] * 4 + odd[:, 1] * 2 + odd[:, 2]                          # (N,) in [0, 8)
        self.slot = parent * 8 + tap                                             # (N,) row of (N_c * 8)
        table = torch.full((self.n_coarse * 8,), n, dtype=torch.int64, device=idx.device)
        self.table = table.scatter_(0, self.slot, torch.arange(n, device=idx.device)).view(self.n_coarse, 8)
        coarse = torch.empty((self.n_coarse, 4), dtype=idx.dtype, device=idx.device)
        self.idx = coarse.index_put_((parent,), torch.cat([idx[:, :1], half], dim=1))  # equal values per parent


class GemmConv(nn.Module):
    """A folded conv (from `FusedConv`) as weight (taps * in, out) + bias, optional ReLU."""

    def __init__(self, fused: FusedConv):
        super().__init__()
        conv = fused.conv
        w = conv.weight.detach()
        cin, cout = conv.in_channels, conv.out_channels
        if conv.conv1x1:
            w2 = w.reshape(cout, cin).t() if FILTER_HWIO else w.reshape(cin, cout)   # as `inference._fold`
        elif conv.inverse:      # inverse conv: (in, 8 * out), column = tap * out + o
            w2 = w.permute(4, 1, 2, 3, 0).reshape(cin, -1)
        else:                   # (taps * in, out), row = tap * in + c
            w2 = w.permute(1, 2, 3, 4, 0).reshape(-1, cout)
        self.register_buffer("weight", w2.contiguous())
        self.register_buffer("bias", fused.bias.detach().clone())
        self.relu = fused.relu
        self.cout = cout

    def gather(self, f: torch.Tensor, table: torch.Tensor, max_rows: int) -> torch.Tensor:
        """addmm over rows of `table` (M, taps) into the zero-padded input, in chunks."""
        fp = torch.cat([f, f.new_zeros(1, f.shape[1])])
        m = table.shape[0]
        if m <= max_rows:
            out = torch.addmm(self.bias, fp[table.reshape(-1)].view(m, -1), self.weight)
        else:
            out = torch.cat([torch.addmm(self.bias, fp[t.reshape(-1)].view(t.shape[0], -1), self.weight)
                             for t in table.split(max_rows)])
        return out.relu_() if self.relu else out

    def dense(self, f: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, f, self.weight)
        return out.relu_() if self.relu else out

    def up(self, f: torch.Tensor, down: DownMap) -> torch.Tensor:
        """Inverse conv: every coarse row against all 8 taps, each fine row picks its own."""
        y = torch.mm(f, self.weight).view(-1, self.cout)                        # (N_c * 8, out)
        out = y.index_select(0, down.slot).add_(self.bias)
        return out.relu_() if self.relu else out


class GemmBlock(nn.Module):
    def __init__(self, block: FusedBlock):
        super().__init__()
        self.conv1, self.conv2 = GemmConv(block.conv1), GemmConv(block.conv2)
        self.proj = None if block.proj is None else GemmConv(block.proj)

    def forward(self, f: torch.Tensor, table: torch.Tensor, max_rows: int) -> torch.Tensor:
        y = self.conv2.gather(self.conv1.gather(f, table, max_rows), table, max_rows)
        skip = f if self.proj is None else self.proj.dense(f)
        return y.add_(skip).relu_()


class GatherGemmUNet(nn.Module):
    """`InferenceUNet` (folded BN, fp32 or fp16) run as gather + GEMM; same input (a sparse
    tensor: features, indices [b, x, y, z], spatial_shape, batch_size) and output."""

    def __init__(self, model: InferenceUNet, max_gather_mb: float = 512.0):
        super().__init__()
        self.in_channels, self.stride, self.dtype = model.in_channels, model.stride, model.dtype
        self.stem = GemmConv(model.stem)
        self.enc0 = nn.ModuleList(GemmBlock(b) for b in model.enc0)
        self.down = nn.ModuleList(GemmConv(c) for c in model.down)
        self.enc = nn.ModuleList(nn.ModuleList(GemmBlock(b) for b in e) for e in model.enc)
        self.up = nn.ModuleList(GemmConv(c) for c in model.up)
        self.dec = nn.ModuleList(nn.ModuleList(GemmBlock(b) for b in d) for d in model.dec)
        self.head, self.scene = model.head, model.scene
        self.max_gather_bytes = int(max_gather_mb * 2**20)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        if mode:
            raise SparseADError("GatherGemmUNet is inference-only (BN is folded); train the SpUNet")
        return super().train(False)

    def _rows(self, taps: int, cin: int) -> int:
        """Rows per gathered chunk under the memory cap."""
        return max(1, self.max_gather_bytes // (taps * cin * torch.finfo(self.dtype).bits // 8))

    @torch.inference_mode()
    def forward(self, x) -> SpUNetOutput:
        feats = x.features
        if feats.shape[1] != self.in_channels:
            raise SparseADError(f"model input: expected {self.in_channels} feature channels, "
                                f"found {feats.shape[1]} (model.in_channels in the config)")
        idx = x.indices.long()
        shape = tuple(padded_shape(x.spatial_shape, self.stride))
        table = subm_map(idx, shape)
        f = self.stem.gather(feats.to(self.dtype), table, self._rows(27, feats.shape[1]))
        for blk in self.enc0:
            f = blk(f, table, self._rows(27, f.shape[1]))
        skips, downs = [], []
        for down, enc in zip(self.down, self.enc, strict=True):
            skips.append((f, table))
            dm = DownMap(idx, shape)
            downs.append(dm)
            f = down.gather(f, dm.table, self._rows(8, f.shape[1]))
            idx, shape = dm.idx, dm.shape
            table = subm_map(idx, shape)
            for blk in enc:
                f = blk(f, table, self._rows(27, f.shape[1]))
        for up, dec in zip(reversed(self.up), reversed(self.dec), strict=True):
            dm = downs.pop()
            skip, table = skips.pop()
            f = torch.cat([up.up(f, dm), skip], dim=1)
            for blk in dec:
                f = blk(f, table, self._rows(27, f.shape[1]))
        voxel_logits = self.head(f).squeeze(1).float()
        scene_logits = None
        if self.scene is not None:
            pooled = pool_per_frame(f, x.indices[:, 0].long(), x.batch_size)
            scene_logits = self.scene(pooled).squeeze(1).float()
        return SpUNetOutput(voxel_logits, scene_logits)
