#!/usr/bin/env python
"""Scores of the lead van on a synthetic split with sudden braking (see sparse_ad/synth/lead_vans.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_ad.synth.lead_vans import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
