"""Benchmarks of soo_ext against the PyTorch code it replaces: ``python -m bench --help``."""
