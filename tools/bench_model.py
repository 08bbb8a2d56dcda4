#!/usr/bin/env python
"""Training throughput (frames/s), peak GPU memory and inference latency per frame."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_ad.bench_model import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
