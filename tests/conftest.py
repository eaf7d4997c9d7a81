import os
import random
import zlib

import pytest
import torch

# Without a GPU the Triton kernels are tested under the interpreter, on CPU tensors. Set here,
# before any test module imports triton, so that the whole session sees one setting.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Fresh random inputs every run; a failure reproduces with APL_TEST_SEED=<the seed in the header>.
BASE_SEED = int(os.environ.get("APL_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return [
        f"apl-kernels test seed: APL_TEST_SEED={BASE_SEED}",
        f"torch CPU capability (the C++ kernels' vector width): {torch.backends.cpu.get_cpu_capability()}",
    ]


@pytest.fixture
def seed(request) -> int:
    """A seed fresh for each run and distinct for each test (reproducible with APL_TEST_SEED)."""
    return (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
