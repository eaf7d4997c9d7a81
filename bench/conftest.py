import os


def pytest_configure(config):
    # `python -m pytest` (the test suite) runs each benchmark once with timing disabled, so that
    # the benchmarks never rot: there, run the quick grid. `python bench/run.py` times the full one.
    timed = config.getoption("benchmark_enable", default=False)
    if config.getoption("benchmark_disable", default=False) and not timed:
        os.environ.setdefault("APL_BENCH_QUICK", "1")
