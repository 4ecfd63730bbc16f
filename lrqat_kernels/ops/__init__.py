"""Triton kernels and their launchers, one module per op family (see the package README/STYLE).

Kept import-free on purpose: importing a kernel module imports triton, which only the fused
paths need.
"""
