"""What the test suite and ``python -m apl_kernels.check`` share: the loss cases, random inputs,
the independent formulas (formulas.py, which imports nothing of the library) and the one
tolerance rule every fused backend is held to (cases.assert_parity)."""
