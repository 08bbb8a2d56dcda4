"""Naming the frame a DataLoader worker died on.

A worker process that dies (a segfault in native code, a kill for memory) cannot report
anything itself, and torch raises a bare "DataLoader worker (pid N) ..." RuntimeError in the
main process wherever that happens to be. So each dataset keeps a small shared-memory table
of what its workers are loading, and the entry points that load frames turn that error into
one line naming the frame and its scenario folder.
"""

from __future__ import annotations

import os
import re
from collections import deque
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sparse_ad.errors import SparseADError

if TYPE_CHECKING:
    from sparse_ad.data.anovox import FrameRef


class InFlight:
    """Which frame each DataLoader worker is loading, in shared memory.

    A worker that dies inside a load (segfault in native code, killed for memory) cannot
    report anything, and torch raises in the main process wherever it happens to be (its
    SIGCHLD handler). Each worker writes (its pid, the frame index) to its row before a load
    and clears the index after, so the row of a dead worker still holds the frame it died on.
    Rows are indexed by worker id; ids beyond the table are not tracked. In the main process
    (no workers) an error surfaces directly and nothing is recorded.
    """

    ROWS = 256
    recent: deque[InFlight] = deque(maxlen=16)   # this process's latest datasets, for the error

    def __init__(self, frames: list[FrameRef]):
        import torch

        self.frames = frames
        self.table = torch.full((self.ROWS, 2), -1, dtype=torch.int64).share_memory_()
        InFlight.recent.append(self)

    @contextmanager
    def loading(self, index: int):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        row = self.table[info.id] if info is not None and info.id < self.ROWS else None
        if row is not None:
            row[0], row[1] = os.getpid(), index
        try:
            yield
        finally:
            if row is not None:
                row[1] = -1

    def frames_of(self, pids: list[int]) -> list[FrameRef]:
        """The frames the workers with these pids were loading when last seen."""
        return [self.frames[i] for pid, i in self.table.tolist() if pid in pids and i >= 0]


@contextmanager
def naming_dead_workers():
    """Turn torch's "DataLoader worker (pid N) ..." RuntimeError, raised when a loader worker
    process died, into a one-line `SparseADError` naming the frame it was loading. Wraps the
    entry points that load frames (train, eval, predict); usable as a decorator."""
    try:
        yield
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        found = re.search(r"pid(?:\(s\))? ([\d, ]+)", str(e))
        pids = [int(p) for p in found.group(1).replace(",", " ").split()] if found else []
        refs = [r for t in InFlight.recent for r in t.frames_of(pids)]
        cause = str(e).splitlines()[0].rstrip(". ")
        if refs:
            where = ", ".join(f"frame {r.name} ({r.scenario.path})" for r in refs)
            raise SparseADError(f"a data loader worker died ({cause}) while loading {where}; check its files, "
                                "or run with data.num_workers=0 to see the error directly") from None
        raise SparseADError(f"a data loader worker died ({cause}) outside a frame load; run with "
                            "data.num_workers=0 to see the error directly") from None
