"""The package version: setup.py reads it, ``soo_ext.__version__`` and ``ops.build_info`` report it."""
__version__ = "0.1.0"
