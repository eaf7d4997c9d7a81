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
# APL_TEST_SWEEP=N runs every randomized test (those taking `seed`) for N fresh base seeds in one
# session, each test id naming its APL_TEST_SEED: the check of a new randomized test over a few
# hundred seeds (CONTRIBUTING.md).
SWEEP = [random.SystemRandom().randrange(2**31) for _ in range(int(os.environ.get("APL_TEST_SWEEP", "0")))]


def pytest_report_header(config):
    return [
        f"apl-kernels test seed: APL_TEST_SEED={BASE_SEED}" + (f" (and a sweep of {len(SWEEP)} seeds)" if SWEEP else ""),
        f"torch CPU capability (the C++ kernels' vector width): {torch.backends.cpu.get_cpu_capability()}",
    ]


def pytest_generate_tests(metafunc):
    if SWEEP and "base_seed" in metafunc.fixturenames:
        metafunc.parametrize("base_seed", SWEEP, indirect=True, ids=[f"APL_TEST_SEED={s}" for s in SWEEP])


@pytest.fixture
def base_seed(request) -> int:
    return getattr(request, "param", BASE_SEED)


@pytest.fixture
def seed(request, base_seed) -> int:
    """A seed fresh for each run and distinct for each test (reproducible with APL_TEST_SEED)."""
    nodeid = request.node.nodeid
    # The id without the sweep's part (first, last or alone among the parameters): a test's seed is
    # then the one a plain run with APL_TEST_SEED=<base seed> gives it.
    for sweep_id, plain in ((f"[APL_TEST_SEED={base_seed}]", ""), (f"[APL_TEST_SEED={base_seed}-", "["),
                            (f"-APL_TEST_SEED={base_seed}]", "]"), (f"-APL_TEST_SEED={base_seed}-", "-")):
        nodeid = nodeid.replace(sweep_id, plain)
    return (base_seed + zlib.crc32(nodeid.encode())) % 2**31
