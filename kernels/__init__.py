"""Triton kernels, each beside its PyTorch reference; dispatch by device (docs/DESIGN.md §7)."""
