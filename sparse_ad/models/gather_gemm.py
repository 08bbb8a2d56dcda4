"""The inference U-Net's sparse convolutions as gather + one dense GEMM each, in plain torch.

Why: on a GPU, one frame's U-Net is bound by the host, not the device — spconv spends
~0.13 ms of Python/C++ per conv call and syncs 13 times per forward, while the kernels
themselves take ~1.7 ms (README, H100 profile). Here every kernel map is built once per
level with a handful of torch ops, and a conv is a few launches, in one of three modes
(`GATHER_MODES`; `GatherGemmUNet(gather=...)`):

    "index_select", "gather": rows of the input gathered by the map  →  (N, taps * C_in),
        then one addmm with the folded weight (taps * C_in, C_out) and the bias (the modes
        differ only in the torch kernel that copies the rows, `gather_rows`)
    "bag": GEMM first, Z = input @ (C_in, taps * C_out), then `embedding_bag` sums, per
        output row, the rows of Z its present neighbours' taps select (`GemmConv._bags`)
    ReLU in place

Why three: the profile of the first ("index_select") found its row copies taking 4.9 of the
6.0 ms of GPU time, in a torch kernel made for wide rows; the other two avoid that kernel in
two different ways, and which is fastest is a measurement (`tools/bench_model.py` times all
three), not an argument. Measured (`DEFAULT_GATHER`): on an H100 (2026-11-26, `anovox_mono`,
GPU time of a forward) index_select 6.0 ms, gather 1.7, bag 2.1; on a 2-core CPU
index_select is the fastest (one 24k-voxel frame, 1 / 2 threads: 1070 / 563 ms, gather
1304 / 912, bag 1354 / 946).

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
GEMMs took 0.4 of a forward's 6.0 ms of GPU time on an H100), and a CPU does (README). The
"bag" mode multiplies every tap too, but its sum reads only present neighbours. Memory: the
gathered matrix is N * 27 * C_in values (plus, in the "gather" mode, its int64 element
index), Z is (N + 1) * 27 * C_out; `max_gather_mb` splits the first into row chunks and the
second into groups of taps.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from spconv.constants import FILTER_HWIO
from torch import nn
from torch.nn import functional as F

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


GATHER_MODES = ("index_select", "gather", "bag")   # how a conv reads its neighbours (`GemmConv.conv`)
ROW_MODES = GATHER_MODES[:2]                          # the ones that gather rows (`gather_rows`)
DEFAULT_GATHER = {"cpu": "index_select", "cuda": "gather"}   # the fastest measured per device (`gather_rows`)
_WIDE = (torch.complex128, torch.int64, torch.int32, torch.int16, torch.uint8)   # widest first


def _wide(row_bytes: int) -> torch.dtype:
    """The widest element type that divides a row of `row_bytes` bytes."""
    return next(w for w in _WIDE if row_bytes % w.itemsize == 0)


def wide_view(fp: torch.Tensor) -> torch.Tensor:
    """The (R, C) matrix `fp` with each row viewed as the widest elements that divide it (16
    bytes for 8k fp16 values), or `fp` itself where its rows do not start on such bounds."""
    size = fp.element_size()
    wide = _wide(fp.shape[1] * size)
    if fp.stride(1) == 1 and (fp.stride(0) * size) % wide.itemsize == 0 \
            and (fp.storage_offset() * size) % wide.itemsize == 0:
        return fp.view(wide)
    return fp


def element_index(index: torch.Tensor, width: int) -> torch.Tensor:
    """(len, width) int64: `index` repeated along each row, the explicit index `torch.gather`
    needs to copy whole rows. Materialized on purpose: a stride-0 (expanded) index sends
    torch.gather to the same one-block-per-row kernel as `index_select`."""
    return index[:, None].expand(-1, width).contiguous()


def check_gather_mode(mode: str, modes: tuple[str, ...] = GATHER_MODES) -> str:
    if mode not in modes:
        raise SparseADError(f"gather_gemm: gather mode must be one of {modes}, found {mode!r}")
    return mode


def gather_rows(fp: torch.Tensor, index: torch.Tensor, mode: str,
                elements: torch.Tensor | None = None) -> torch.Tensor:
    """fp[index]: the rows of the (R, C) matrix `fp` at the flat int64 `index`, (len, C), by
    one of the `ROW_MODES`. Both copy bits, so their results are identical; why there are two:

    * `index_select`: torch (2.11) copies rows for `index_select`, and for `fp[index]` too,
      with a kernel that runs one CUDA block per index; a 32-channel fp16 row is 64 bytes, so
      4 threads of the block copy anything. On the H100 (2026-11-26, `tools/profile_gpu.py`)
      the 41 conv gathers of an `anovox_mono` forward (8.6M indices) took 4.9 of its 6.0 ms of
      GPU time, ~119 us each; viewing the rows as 16-byte elements did not change the kernel.
    * `gather`: `torch.gather` over the rows as their widest elements (`wide_view`) with an
      explicit (len, elements) index (`element_index`), whose kernel runs one thread per
      element. Its price: that index, 8 bytes per element, is read once per gather (and
      written once per map and width: `elements`, when the caller has it, `Taps.elements`)."""
    if check_gather_mode(mode, ROW_MODES) == "index_select":
        return torch.index_select(fp, 0, index)
    src = wide_view(fp)
    if elements is None:
        elements = element_index(index, src.shape[1])
    return torch.gather(src, 0, elements).view(fp.dtype)


class Taps:
    """A map's (M, taps) table as the convs of one forward read it, in gather mode `mode`.

    What a mode derives from the table is made once here and shared by every conv that reads
    the same map (all the convs of a level): the "gather" mode's element index per row width,
    the "bag" mode's bag index. A `Taps` lives for one `GatherGemmUNet.run` and is never kept:
    a CUDA graph must recompute both from its static tables on every replay."""

    def __init__(self, table: torch.Tensor, mode: str):
        self.table, self.mode = table, mode
        self.rows, self.taps = table.shape
        self._made: dict[tuple, torch.Tensor] = {}

    def _once(self, key: tuple, whole: bool, make) -> torch.Tensor:
        """`make()`, kept for the next conv only when it covers the whole table (a chunk under
        the memory cap is made per chunk, or the cap would not hold)."""
        if not whole:
            return make()
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def elements(self, width: int, lo: int, n: int) -> torch.Tensor:
        """(n * taps, width): the element index of table rows lo .. lo + n (`element_index`)."""
        return self._once(("elements", width, lo, n), n == self.rows,
                          lambda: element_index(self.table[lo:lo + n].reshape(-1), width))

    def bags(self, none: int, lo: int, hi: int) -> torch.Tensor:
        """(M + 1, hi - lo) int64, the "bag" mode's index of taps lo .. hi: row i, column j
        holds the row of `Z` = the input @ those taps' weights, viewed ((R + 1) * (hi - lo),
        out), that tap lo + j of output row i reads, i.e. `table * (hi - lo) + j`; where there
        is no voxel (`none`), and in the extra last row, `none * (hi - lo)`, the padding index
        that `embedding_bag` skips. So the extra last output row sums nothing: zero."""
        def make():
            g = hi - lo
            t = self.table[:, lo:hi]
            out = t.new_full((self.rows + 1, g), none * g)
            out[:-1].copy_(torch.where(t != none, t * g + _const(tuple(range(g)), t.device), none * g))
            return out

        return self._once(("bags", none, lo, hi), (lo, hi) == (0, self.taps), make)


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
        self.cin, self.cout = cin, cout
        self.reads_map = not (conv.conv1x1 or conv.inverse)   # a conv over a map's taps (`conv`)
        self.register_buffer("bag_weight", None, persistent=False)   # set by `use_bags`

    def use_bags(self, on: bool) -> None:
        """The "bag" mode multiplies by all taps at once: weight as (in, taps * out), column =
        tap * out + o (the inverse conv's layout). Made only while that mode is in use."""
        if not self.reads_map:
            return
        w = self.weight
        self.bag_weight = (w.view(-1, self.cin, self.cout).permute(1, 0, 2).reshape(self.cin, -1).contiguous()
                           if on else None)

    def conv(self, fp: torch.Tensor, taps: Taps, cap: int) -> torch.Tensor:
        """This conv over a map: output row i reads rows `taps.table[i]` of `fp`, one per tap.
        (M + 1, out), padded. The intermediate matrix (gathered rows, or the "bag" mode's
        products per tap) stays under `cap` bytes: split by output rows, or by taps."""
        out = self._bags(fp, taps, cap) if taps.mode == "bag" else self._gathered(fp, taps, cap)
        return out.relu_() if self.relu else out

    def _gathered(self, fp: torch.Tensor, taps: Taps, cap: int) -> torch.Tensor:
        """Rows gathered into (rows, taps * in), times the weight (taps * in, out), bias added
        by the same `addmm`."""
        wide = None if taps.mode == "index_select" else wide_view(fp)
        index_bytes = 0 if wide is None else wide.shape[1] * 8   # the "gather" mode's element index
        per_row = taps.taps * (fp.shape[1] * fp.element_size() + index_bytes)
        m, step = taps.rows, max(1, cap // per_row)
        out = _padded(m, self.cout, fp)
        for lo in range(0, m, step):
            n = min(step, m - lo)
            elements = None if wide is None else taps.elements(wide.shape[1], lo, n)
            cols = gather_rows(fp, taps.table[lo:lo + n].reshape(-1), taps.mode, elements)
            torch.addmm(self.bias, cols.view(n, -1), self.weight, out=out[lo:lo + n])
        return out

    def _bags(self, fp: torch.Tensor, taps: Taps, cap: int) -> torch.Tensor:
        """GEMM first, gather after: Z = fp @ (in, taps * out) holds every input row's product
        with every tap's weight, and `embedding_bag` sums, per output row, the products its
        taps read, skipping absent neighbours (the padding index, `Taps.bags`). No gathered
        matrix, and only present neighbours are read; Z is (R + 1) * taps * out values, a
        split of the taps when over `cap`. fp16 products are rounded per tap before the sum
        (fp32 inside `embedding_bag`), the gather modes round once after it: not the same bits."""
        r, none = fp.shape[0], fp.shape[0] - 1
        step = max(1, cap // (r * self.cout * fp.element_size()))
        out = None
        for lo in range(0, taps.taps, step):
            hi = min(taps.taps, lo + step)
            z = torch.mm(fp, self.bag_weight[:, lo * self.cout:hi * self.cout]).view(-1, self.cout)
            part = F.embedding_bag(taps.bags(none, lo, hi), z, mode="sum", padding_idx=none * (hi - lo))
            out = part if out is None else out.add_(part)
        out[:-1].add_(self.bias)   # the extra last row stays zero
        return out

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

    def forward(self, fp: torch.Tensor, taps: Taps, cap: int) -> torch.Tensor:
        y = self.conv2.conv(self.conv1.conv(fp, taps, cap), taps, cap)
        skip = fp if self.proj is None else self.proj.dense(fp)
        return y.add_(skip).relu_()   # zero rows add to zero


class GatherGemmUNet(nn.Module):
    """`InferenceUNet` (folded BN, fp32 or fp16) run as gather + GEMM; same input (a sparse
    tensor: features, indices [b, x, y, z], spatial_shape, batch_size) and output."""

    def __init__(self, model: InferenceUNet, max_gather_mb: float = 512.0, gather: str | None = None):
        super().__init__()
        self.in_channels, self.stride, self.dtype = model.in_channels, model.stride, model.dtype
        copy_levels(self, model, GemmConv, GemmBlock)
        self._set_mode(gather or DEFAULT_GATHER[next(model.parameters()).device.type])
        self.gather_named = gather is not None   # else the device's DEFAULT_GATHER, chosen by `run`'s input
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
        """How the convs read their neighbours (`GATHER_MODES`)."""
        return self._gather_mode

    @gather_mode.setter
    def gather_mode(self, mode: str) -> None:
        self._set_mode(mode)
        self.gather_named = True

    def _set_mode(self, mode: str) -> None:
        self._gather_mode = check_gather_mode(mode)
        for m in self.modules():
            if isinstance(m, GemmConv):
                m.use_bags(mode == "bag")

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
        if not self.gather_named and self.gather_mode != DEFAULT_GATHER[f.device.type]:
            self._set_mode(DEFAULT_GATHER[f.device.type])   # moved to another device since it was built
        mode, cap = self.gather_mode, self.max_gather_bytes
        subm = [Taps(m.table, mode) for m in maps]
        down = [Taps(m.down_table, mode) for m in maps[:-1]]
        f = self.stem.conv(f, subm[0], cap)
        for blk in self.enc0:
            f = blk(f, subm[0], cap)
        skips = []
        for level, (conv, enc) in enumerate(zip(self.down, self.enc, strict=True)):
            skips.append(f)
            f = conv.conv(f, down[level], cap)
            for blk in enc:
                f = blk(f, subm[level + 1], cap)
        for level in reversed(range(len(self.up))):
            f = torch.cat([self.up[level].up(f, maps[level].slot), skips.pop()], dim=1)
            for blk in self.dec[level]:
                f = blk(f, subm[level], cap)
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
