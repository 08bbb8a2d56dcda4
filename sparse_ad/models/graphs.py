"""The gather_gemm engine's convs replayed from CUDA graphs: one launch from the host per frame.

Why: even as plain torch ops (`gather_gemm.py`) a forward is ~250 conv launches, each
costing the host a few microseconds to issue. A CUDA graph captures the launches once and
replays them with one call. Measured on an H100 (2026-11-26, README, `anovox_mono`): with
index_select row copies it gained nothing, as their 6.0 ms of GPU time per forward is what a
replay waits for; with torch.gather copies (1.7 ms of GPU time, `gather_rows`) the eager
forward is bound by the host, and the graphs cut the whole path from 8.2 to 5.2 ms a frame.

A graph has fixed shapes and addresses, a frame's voxel counts do not. So each level's row
count is rounded up (`level_rows`: the full-resolution level to a `bucket`, at most 1/8 more
rows, eight sizes per octave; the coarser levels to a power of two), and per signature (the
row counts of all levels) the convs are captured once over static buffers: the padded input
features, every level's maps, the output. Why coarse levels round so far: a capture costs a
device sync, two warm-up runs and the capture itself (58-114 ms on an H100), while padding
a coarse level only enlarges GEMMs of a few hundred to a few thousand rows; and the coarse
counts of consecutive frames wander independently of the fine one. With eight sizes per
octave on every level, 240 frames of 24 synthetic scenarios scored one at a time
(`anovox_mono`'s five levels, `plan` run on CPU) fell into 108 signatures and would have
captured 141 times with 8 kept; with powers of two above level 0: 13 signatures, 14
captures, and 5%, 19%, 63%, 27%, 44% more rows per level. Per frame:

    maps built eagerly (`GatherGemmUNet.plan`; its host syncs), "no voxel" = the bucket
    maps and features copied into the first rows of the signature's buffers
    the graph replayed; the heads run on the output's first N rows

Rows past a frame's own count hold what an earlier frame of the same signature left there:
they point only at rows of the same buckets, so they compute finite numbers that no real row
reads (a real row reads real rows and the zero row). Off CUDA the same buffers are run
eagerly, which is how the CPU tests check all of this (the capture itself needs a GPU).
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict

import torch
from torch import nn

from sparse_ad.errors import SparseADError
from sparse_ad.models.gather_gemm import GatherGemmUNet, LevelMaps
from sparse_ad.models.spunet import SpUNetOutput, check_features, heads


def bucket(n: int) -> int:
    """n rounded up to m * 2^k with m in [8, 16) (at least 64): at most 12.5% more rows."""
    if n <= 64:
        return 64
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def level_rows(level: int, n: int) -> int:
    """Rows a level of n voxels runs with: `bucket(n)` at full resolution, else the power of
    two >= n (at least 64); see the module docstring for why."""
    return bucket(n) if level == 0 else max(64, 1 << (n - 1).bit_length())


class _Signature:
    """Static buffers of one bucket signature (row counts per level) and its graph."""

    def __init__(self, rows: tuple[int, ...], channels: int, dtype: torch.dtype, device: torch.device):
        def full(shape, value):
            return torch.full(shape, value, dtype=torch.int64, device=device)

        self.inp = torch.zeros((rows[0] + 1, channels), dtype=dtype, device=device)
        self.maps = [LevelMaps(full((r, 27), r),
                               full((rows[i + 1], 8), r) if i + 1 < len(rows) else None,
                               full((r,), 0) if i + 1 < len(rows) else None)
                     for i, r in enumerate(rows)]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.nbytes = self.inp.nbytes + sum(t.nbytes for m in self.maps
                                            for t in (m.table, m.down_table, m.slot) if t is not None)

    def load(self, feats: torch.Tensor, maps: list[LevelMaps]) -> None:
        """The frame's features and maps into the first rows of the buffers."""
        self.inp[:feats.shape[0]].copy_(feats)
        for dst, src in zip(self.maps, maps, strict=True):
            dst.table[:src.table.shape[0]].copy_(src.table)
            if src.down_table is not None:
                dst.down_table[:src.down_table.shape[0]].copy_(src.down_table)
                dst.slot[:src.slot.shape[0]].copy_(src.slot)


class GraphedGatherGemm(nn.Module):
    """`GatherGemmUNet` whose convs replay CUDA graphs, one per bucket signature (the
    `max_graphs` most recently used are kept, fewer where their static buffers — input, maps:
    int64 (rows, 27) per level — would pass `max_buffer_mb`, ~370 MB for 8 frames x 4 views;
    all share one memory pool, as they never run at the same time). Same input and output as
    the other engines."""

    def __init__(self, net: GatherGemmUNet, max_graphs: int = 8, max_buffer_mb: float = 1024.0):
        super().__init__()
        self.net = net
        self.in_channels, self.stride, self.dtype = net.in_channels, net.stride, net.dtype
        self.max_graphs = max_graphs
        self.max_buffer_bytes = int(max_buffer_mb * 2**20)   # the kept signatures' static buffers, together
        self._signatures: OrderedDict[tuple[int, ...], _Signature] = OrderedDict()
        self._pool = None
        self.captures = 0   # graphs captured so far, evicted ones included (`eval` reports it)
        self.capture_s = 0.0   # host seconds they took, warm-ups and syncs included (`eval` reports it)
        self.eager_reason: str | None = None   # why captures stopped and the convs run eagerly, if they did

    def train(self, mode: bool = True):
        self.net.train(mode)   # refuses mode=True
        return super().train(False)

    @property
    def graphs(self) -> int:
        """Signatures captured so far and still kept."""
        return sum(s.graph is not None for s in self._signatures.values())

    @torch.inference_mode()
    def forward(self, x) -> SpUNetOutput:
        check_features(x, self.in_channels)
        feats = x.features
        maps = self.net.plan(x.indices.long(), x.spatial_shape, rows=level_rows)
        rows = tuple(level_rows(level, m.table.shape[0]) for level, m in enumerate(maps))
        sig = self._signatures.pop(rows, None) or _Signature(rows, feats.shape[1], self.dtype, feats.device)
        self._signatures[rows] = sig                        # most recently used last
        while len(self._signatures) > self.max_graphs or (  # the newest is always kept
                len(self._signatures) > 1 and sum(s.nbytes for s in self._signatures.values()) > self.max_buffer_bytes):
            self._signatures.popitem(last=False)
        sig.load(feats, maps)
        out = self._replay(sig) if feats.device.type == "cuda" else self.net.run(sig.inp, sig.maps)
        return heads(self.net.head, self.net.scene, out[:feats.shape[0]], x.indices[:, 0], x.batch_size)

    def _replay(self, sig: _Signature) -> torch.Tensor:
        """The signature's graph replayed (captured first if new). If a capture fails, this
        model warns once, with the whole error chain, and runs its convs eagerly from then on:
        the same ops (gather_gemm, what validation scored with), so a run is not lost to it."""
        if self.eager_reason is not None:
            return self.net.run(sig.inp, sig.maps)
        if sig.graph is None:
            try:
                torch.cuda.synchronize()   # time the capture alone, not the work queued before it
                t0 = time.perf_counter()
                self._capture(sig)
                torch.cuda.synchronize()   # the warm-ups' device time belongs to the capture
            except Exception as e:   # noqa: BLE001 - SparseADError from _capture, or a late CUDA error
                self.eager_reason = error_text(e)
                warnings.warn(f"{self.eager_reason}; running the convs eagerly instead", stacklevel=3)
                return self.net.run(sig.inp, sig.maps)
            self.capture_s += time.perf_counter() - t0
        sig.graph.replay()
        return sig.out

    def _capture(self, sig: _Signature) -> None:
        """Warm up on a side stream (cuBLAS handles, allocator), then capture `run`. Any
        failure is one error naming every exception in its chain: when an op breaks a
        capture, `torch.cuda.graph`'s exit raises its own "previous error during capture",
        which would otherwise hide the op. The warm-up runs with torch's sync debug mode
        at "warn", so an op that synchronises (and so cannot be captured) is named with its
        line even before the capture fails."""
        stream = torch.cuda.current_stream()
        sync_mode = torch.cuda.get_sync_debug_mode()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(stream)
            torch.cuda.set_sync_debug_mode("warn")
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.net.run(sig.inp, sig.maps)
            torch.cuda.set_sync_debug_mode(sync_mode)
            stream.wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (a loader's pin-memory thread) may go on
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                sig.out = self.net.run(sig.inp, sig.maps)
        except Exception as e:   # RuntimeError, torch.AcceleratorError, ...
            torch.cuda.set_sync_debug_mode(sync_mode)
            torch.cuda.set_stream(stream)   # a failed exit leaves the capture stream current
            sig.out = None
            raise SparseADError(f"CUDA graph capture failed ({error_chain(e)}); the gather_gemm engine "
                                "(--engine gather_gemm) runs the same ops without a graph") from e
        sig.graph = graph
        self.captures += 1


def error_text(e: BaseException) -> str:
    """One line for `e`: a SparseADError's own message (`_capture`'s already names the chain),
    else its chain (`error_chain`)."""
    return str(e) if isinstance(e, SparseADError) else error_chain(e)


def error_chain(e: BaseException) -> str:
    """The first line of `e` and of each exception it was raised from or during, outermost
    first, joined by " <- "."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)
