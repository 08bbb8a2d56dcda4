#!/usr/bin/env python
"""Train a config on several synthetic splits and score each on its held-out scenarios and
an independent test split: a table on stdout, JSON on disk (see sparse_ad/study.py).

    python tools/quality_study.py --config configs/demo.yaml --seeds 0 1 2 --out runs/study [key=value ...]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_ad.errors import SparseADError  # noqa: E402
from sparse_ad.study import add_study_args, run_study  # noqa: E402

if __name__ == "__main__":
    parser = add_study_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    try:
        run_study(parser.parse_args())
    except SparseADError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1))
