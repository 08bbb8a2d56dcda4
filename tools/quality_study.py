#!/usr/bin/env python
"""Thin wrapper: `python tools/quality_study.py ARGS` is `sparse-ad study ARGS`: train a config
on several synthetic seeds, score each on its held-out scenarios and an independent test split;
a table on stdout, JSON on disk (see sparse_ad/study.py and --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_ad.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
