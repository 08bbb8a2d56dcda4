#!/usr/bin/env python
"""Thin wrapper: `python tools/check_alignment.py ARGS` is `sparse-ad check-alignment ARGS` (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_ad.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["check-alignment", *sys.argv[1:]]))
