"""The reproduction of the APL paper's experiments: ``python -m apl_kernels.reproduce`` (see cli.py)."""
