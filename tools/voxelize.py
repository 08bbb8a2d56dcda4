"""Benchmark voxelization (CPU, and CUDA when present): a table on stdout, JSON on disk.

    python tools/voxelize.py --sizes 120000,1000000 --repeats 5
Same as `sparse-ad bench-voxelize`.
"""

import argparse
import sys

from sparse_ad.bench import add_bench_args, run_bench
from sparse_ad.errors import SparseADError

if __name__ == "__main__":
    parser = add_bench_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    try:
        sys.exit(run_bench(parser.parse_args()))
    except SparseADError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1))
