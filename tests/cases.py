# The suite's cases and tolerance rule live in apl_kernels.testing (so that `python -m apl_kernels.check`
# runs the same ones); this name stays for the test modules that import it.
from apl_kernels.testing.cases import *  # noqa: F401,F403
