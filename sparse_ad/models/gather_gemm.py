"""The inference U-Net's sparse convolutions as gather + one dense GEMM each, in plain torch.

Why: on a GPU, one frame's U-Net is bound by the host, not the device — spconv spends
~0.13 ms of Python/C++ per conv call and syncs 13 times per forward, while the kernels
themselves take ~1.7 ms (README, H100 profile). Here every kernel map is built once per
level with a handful of torch ops, and a conv is four launches:

    rows of the input gathered by the map          →  (N, taps * C_in)
    addmm with the folded weight (taps * C_in, C_out) and bias, written into the output
    ReLU in place; the output's extra last row set to zero

Every feature matrix carries one extra, zero, last row (`_padded`): a map points there for
"no voxel", so absent neighbours contribute nothing without a mask or a copy per conv.

Maps, for voxel rows `[b, x, y, z]` on a level whose box is `shape`:

* submanifold 3x3x3 (`subm_map`): for each row and each of the 27 offsets d = k - 1 the row
  of the voxel at (x, y, z) + d, or N (the zero row) where there is none or it lies outside
  the box. Built by sorting the level's linear keys once (a coarse level's come sorted from
  its `torch.unique`) and one `searchsorted` of all N * 27 neighbour keys: no host sync.
* stride-2 2x2x2 down (`DownMap`): a coarse voxel per occupied 2x2x2 cell (`torch.unique`,
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

The zero-row trick costs FLOPs for absent neighbours: on a synthetic 120k-point sweep a voxel
has 8-9 of its 26 neighbours at every level (24088, 8722, 2662, 894, 316 voxels), so this does
~3x the arithmetic of spconv's pair lists — which a GPU's tensor cores do not notice (the
GEMMs took 0.4 of a forward's 6.0 ms of GPU time on an H100), and a CPU does (README). Memory:
the gathered matrix is N * 27 * C_in values (plus, in the "gather" mode, its int64 element
index); `max_gather_mb` splits it into row chunks.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from spconv.constants import FILTER_HWIO
from torch import nn

from sparse_ad.errors import SparseADError
from sparse_ad.models.inference import FusedBlock, FusedConv, InferenceUNet, copy_levels
from sparse_ad.models.spunet import SpUNetOutput, check_features, heads, padded_shape

_TAPS27 = list(itertools.product((-1, 0, 1), repeat=3))   # tap k = 9 kx + 3 ky + kz, offset k - 1


@functools.lru_cache(maxsize=64)
def _const(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small int64 constant on `device`, made once: `torch.tensor(..., device=cuda)` is a
    host-to-device copy from pageable memory, which waits for the stream."""
    return torch.tensor(values, dtype=torch.int64, device=device)


def _framed_strides(shape) -> tuple[int, int, int, int]:
    """Strides of [b, x, y, z] in the box `shape` framed by one empty cell on every side. In
    the frame, the key of a neighbour is the row's key plus a constant per tap, and a
    neighbour outside the box is a frame cell that holds no voxel, so no bounds check is
    needed."""
    fy, fz = shape[1] + 2, shape[2] + 2
    return (shape[0] + 2) * fy * fz, fy * fz, fz, 1


def _framed_keys(idx: torch.Tensor, shape) -> torch.Tensor:
    """Linear keys of rows [b, x, y, z] in the framed box (`_framed_strides`)."""
    strides = _framed_strides(shape)
    return (idx * _const(strides, idx.device)).sum(dim=1) + (strides[1] + strides[2] + 1)


def subm_map(idx: torch.Tensor, shape, none: int | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 27) int64: row of the neighbour at each 3x3x3 tap, `none` (default N) where there
    is none. `keys`: the rows' framed keys if the caller has them in ascending order (a
    coarse level, from `DownMap`), which saves computing and sorting them."""
    n = idx.shape[0]
    strides = _framed_strides(shape)
    if keys is None:
        keys = _framed_keys(idx, shape)
        sorted_keys, order = torch.sort(keys)
    else:
        sorted_keys, order = keys, None
    deltas = _const(tuple(dx * strides[1] + dy * strides[2] + dz for dx, dy, dz in _TAPS27), idx.device)
    qk = keys[:, None] + deltas                                                  # (N, 27)
    pos = torch.searchsorted(sorted_keys, qk).clamp_(max=n - 1)
    found = pos if order is None else torch.take(order, pos)
    return torch.where(torch.take(sorted_keys, pos) == qk, found, n if none is None else none)


class DownMap:
    """The 2x2x2 / stride-2 map from a level (rows `idx`, box `shape`) to the next one."""

    def __init__(self, idx: torch.Tensor, shape, none: int | None = None):
        if any(s % 2 for s in shape):
            raise SparseADError(f"gather_gemm: level box {tuple(shape)} is not even; pad the spatial shape")
        n = idx.shape[0]
        self.shape = tuple(s // 2 for s in shape)
        half = idx // _const((1, 2, 2, 2), idx.device)                           # [b, x//2, y//2, z//2]
        keys, parent = torch.unique(_framed_keys(half, self.shape), return_inverse=True)   # host sync
        self.keys = keys                  # ascending: the coarse level's framed keys, row by row
        self.n_coarse = keys.shape[0]
        tap = ((idx & 1) * _const((0, 4, 2, 1), idx.device)).sum(dim=1)          # (N,) in [0, 8)
        self.slot = parent * 8 + tap                                             # (N,) row of (N_c * 8)
        table = torch.full((self.n_coarse * 8,), n if none is None else none, dtype=torch.int64, device=idx.device)
        self.table = table.scatter_(0, self.slot, torch.arange(n, device=idx.device)).view(self.n_coarse, 8)
        coarse = torch.empty((self.n_coarse, 4), dtype=idx.dtype, device=idx.device)
        self.idx = coarse.index_put_((parent,), half)                           # equal values per parent


@dataclass
class LevelMaps:
    """One level's maps: its submanifold map and, except on the coarsest level, the maps to
    the next level (`DownMap.table` and `.slot`)."""

    table: torch.Tensor                      # (N, 27)
    down_table: torch.Tensor | None = None   # (N_next, 8)
    slot: torch.Tensor | None = None         # (N,)


GATHER_MODES = ("index_select", "gather")
DEFAULT_GATHER = "index_select"
_WIDE = (torch.complex128, torch.int64, torch.int32, torch.int16, torch.uint8)   # widest first


def _wide(row_bytes: int) -> torch.dtype:
    """The widest element type that divides a row of `row_bytes` bytes."""
    return next(w for w in _WIDE if row_bytes % w.itemsize == 0)


def check_gather_mode(mode: str) -> str:
    if mode not in GATHER_MODES:
        raise SparseADError(f"gather_gemm: gather mode must be one of {GATHER_MODES}, found {mode!r}")
    return mode


def gather_rows(fp: torch.Tensor, index: torch.Tensor, mode: str = DEFAULT_GATHER) -> torch.Tensor:
    """fp[index]: the rows of the (R, C) matrix `fp` at the flat int64 `index`, (len, C).

    Why two ways: torch (2.11) copies rows for `index_select`, and for `fp[index]` too, with
    a kernel that runs one CUDA block per index; a 32-channel fp16 row is 64 bytes, so 4
    threads of the block copy anything. On the H100 (2026-11-26, `tools/profile_gpu.py`)
    the 41 conv gathers of an `anovox_mono` forward (8.6M indices) took 4.9 of its 6.0 ms of
    GPU time, ~119 us each; viewing the rows as 16-byte elements did not change the kernel.
    `gather` views each row as the widest element type that divides it (16 bytes for 8k
    fp16 values) and copies with `torch.gather` over an explicit (len, elements) index, whose
    kernel runs one thread per element. Its price: that index, 8 bytes per element, is
    written and read once per gather. Both copy bits: the results are identical."""
    if check_gather_mode(mode) == "index_select":
        return torch.index_select(fp, 0, index)
    src, wide, size = fp, _wide(fp.shape[1] * fp.element_size()), fp.element_size()
    if fp.stride(1) == 1 and (fp.stride(0) * size) % wide.itemsize == 0 \
            and (fp.storage_offset() * size) % wide.itemsize == 0:   # rows start on element bounds
        src = fp.view(wide)
    cols = torch.gather(src, 0, index[:, None].expand(-1, src.shape[1]).contiguous())
    return cols.view(fp.dtype) if src is not fp else cols


def _padded(rows: int, cols: int, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """(rows + 1, cols), the last row zero: every feature matrix here carries that zero row,
    which a map's "no voxel" index (= rows) gathers."""
    out = like.new_empty((rows + 1, cols), dtype=dtype)
    out[rows].zero_()
    return out


class GemmConv(nn.Module):
    """A folded conv (from `FusedConv`) as weight (taps * in, out) + bias, optional ReLU.
    Inputs and outputs are padded feature matrices (`_padded`)."""

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
        self.gather_mode = DEFAULT_GATHER   # set by `GatherGemmUNet.gather_mode` on every conv

    def gather(self, fp: torch.Tensor, table: torch.Tensor, max_rows: int) -> torch.Tensor:
        """Rows of `table` (M, taps) gathered from `fp`, times the weight, in row chunks."""
        m = table.shape[0]
        out = _padded(m, self.cout, fp)
        for lo in range(0, m, max_rows):
            t = table[lo:lo + max_rows]
            cols = gather_rows(fp, t.reshape(-1), self.gather_mode).view(t.shape[0], -1)
            torch.addmm(self.bias, cols, self.weight, out=out[lo:lo + t.shape[0]])
        return out.relu_() if self.relu else out

    def dense(self, fp: torch.Tensor) -> torch.Tensor:
        """1x1x1 conv; the zero row stays zero only without bias, so it is reset."""
        out = torch.addmm(self.bias, fp, self.weight)
        out[-1].zero_()
        return out.relu_() if self.relu else out

    def up(self, fp: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Inverse conv: every coarse row against all 8 taps, each fine row picks its own
        (`slot`: parent * 8 + tap, as in `DownMap`)."""
        n = slot.shape[0]
        y = torch.mm(fp[:-1], self.weight).view(-1, self.cout)                   # (N_c * 8, out)
        out = _padded(n, self.cout, fp)
        torch.index_select(y, 0, slot, out=out[:n]).add_(self.bias)
        return out.relu_() if self.relu else out


class GemmBlock(nn.Module):
    def __init__(self, block: FusedBlock):
        super().__init__()
        self.conv1, self.conv2 = GemmConv(block.conv1), GemmConv(block.conv2)
        self.proj = None if block.proj is None else GemmConv(block.proj)

    def forward(self, fp: torch.Tensor, table: torch.Tensor, max_rows: int) -> torch.Tensor:
        y = self.conv2.gather(self.conv1.gather(fp, table, max_rows), table, max_rows)
        skip = fp if self.proj is None else self.proj.dense(fp)
        return y.add_(skip).relu_()   # zero rows add to zero


class GatherGemmUNet(nn.Module):
    """`InferenceUNet` (folded BN, fp32 or fp16) run as gather + GEMM; same input (a sparse
    tensor: features, indices [b, x, y, z], spatial_shape, batch_size) and output."""

    def __init__(self, model: InferenceUNet, max_gather_mb: float = 512.0, gather: str = DEFAULT_GATHER):
        super().__init__()
        self.in_channels, self.stride, self.dtype = model.in_channels, model.stride, model.dtype
        copy_levels(self, model, GemmConv, GemmBlock)
        self.gather_mode = gather
        self.head, self.scene = model.head, model.scene
        self.max_gather_bytes = int(max_gather_mb * 2**20)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        if mode:
            raise SparseADError("GatherGemmUNet is inference-only (BN is folded); train the SpUNet")
        return super().train(False)

    @property
    def gather_mode(self) -> str:
        """How the convs gather rows (`gather_rows`); set here, it is set on every conv."""
        return self.stem.gather_mode

    @gather_mode.setter
    def gather_mode(self, mode: str) -> None:
        check_gather_mode(mode)
        for m in self.modules():
            if isinstance(m, GemmConv):
                m.gather_mode = mode

    def _rows(self, taps: int, cin: int) -> int:
        """Rows per gathered chunk under the memory cap (the "gather" mode's index counted)."""
        row_bytes = cin * torch.finfo(self.dtype).bits // 8
        index_bytes = row_bytes // _wide(row_bytes).itemsize * 8 if self.gather_mode == "gather" else 0
        return max(1, self.max_gather_bytes // (taps * (row_bytes + index_bytes)))

    def plan(self, idx: torch.Tensor, spatial_shape, rows=None) -> list[LevelMaps]:
        """Every level's maps for voxel rows `idx` [b, x, y, z] (the host syncs are here).
        `rows(level, n)`: the row count a level of n voxels is run with (default n); the maps'
        "no voxel" index is that count (the padded matrices' zero row, `graphs.py`)."""
        rows = rows or (lambda level, n: n)
        shape = tuple(padded_shape(spatial_shape, self.stride))
        maps, keys = [], None
        for level in range(len(self.down) + 1):
            none = rows(level, idx.shape[0])
            table = subm_map(idx, shape, none, keys)
            if level == len(self.down):
                maps.append(LevelMaps(table))
                break
            dm = DownMap(idx, shape, none)
            maps.append(LevelMaps(table, dm.table, dm.slot))
            idx, shape, keys = dm.idx, dm.shape, dm.keys
        return maps

    def run(self, f: torch.Tensor, maps: list[LevelMaps]) -> torch.Tensor:
        """The convs: padded input features (rows + 1, C) in the model's dtype → padded final
        features (rows + 1, w0). No host sync, fixed shapes for fixed map shapes (so a CUDA
        graph can capture it)."""
        f = self.stem.gather(f, maps[0].table, self._rows(27, f.shape[1]))
        for blk in self.enc0:
            f = blk(f, maps[0].table, self._rows(27, f.shape[1]))
        skips = []
        for level, (down, enc) in enumerate(zip(self.down, self.enc, strict=True)):
            skips.append(f)
            f = down.gather(f, maps[level].down_table, self._rows(8, f.shape[1]))
            for blk in enc:
                f = blk(f, maps[level + 1].table, self._rows(27, f.shape[1]))
        for level in reversed(range(len(self.up))):
            f = torch.cat([self.up[level].up(f, maps[level].slot), skips.pop()], dim=1)
            for blk in self.dec[level]:
                f = blk(f, maps[level].table, self._rows(27, f.shape[1]))
        return f

    @torch.inference_mode()
    def forward(self, x) -> SpUNetOutput:
        check_features(x, self.in_channels)
        feats = x.features
        maps = self.plan(x.indices.long(), x.spatial_shape)
        f = _padded(feats.shape[0], feats.shape[1], feats, self.dtype)
        f[:-1] = feats
        f = self.run(f, maps)
        return heads(self.head, self.scene, f[:-1], x.indices[:, 0], x.batch_size)
