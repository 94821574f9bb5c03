"""Triton kernels, each beside its PyTorch reference; dispatch by device (DESIGN.md §5)."""
