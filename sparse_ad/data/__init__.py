"""Data: AnoVox reader, per-frame file readers, label join, dataset and batching."""
