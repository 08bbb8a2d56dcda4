"""Benchmark voxelization (CPU, and CUDA when present): a table on stdout, JSON on disk.

    python tools/voxelize.py --sizes 120000,1000000 --repeats 5
Same as `sparse-ad bench-voxelize`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_ad.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench-voxelize", *sys.argv[1:]]))
