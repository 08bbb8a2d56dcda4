#!/usr/bin/env python
"""Thin wrapper: `python tools/eval_preds.py ARGS` is `sparse-ad eval-preds ARGS` (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_ad.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval-preds", *sys.argv[1:]]))
