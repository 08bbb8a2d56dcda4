"""Sparse U-Net and the sparse-tensor builder."""
