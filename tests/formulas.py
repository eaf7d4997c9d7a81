# The independent formulas live in the package (apl_kernels.testing.formulas); see tests/cases.py.
from apl_kernels.testing.formulas import *  # noqa: F401,F403
