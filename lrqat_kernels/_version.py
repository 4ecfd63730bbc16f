"""The package version (one place: ``lrqat_kernels.__version__``, the build and the exports read it)."""

__version__ = "0.1.0"
