"""Compile the C++/CUDA extension ahead of time: ``python -m apl_kernels.build``.

The libraries are built against the torch this Python imports and cached (see
apl_kernels.backends.cpp); later imports verify them and load them without
compiling, and rebuild one that is damaged. Useful before a SLURM array starts,
in a container image, or to see compiler errors; ``--force`` rebuilds anyway.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .backends import BackendUnavailable
from .backends.cpp import cuda_unavailable_reason, ensure_loaded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apl_kernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true", help="build only the CPU library")
    parser.add_argument("--require-cuda", action="store_true",
                        help="fail unless the CUDA library is built too (used by CI)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    parser.add_argument("--force", action="store_true",
                        help="rebuild from scratch even when the cache holds a verified library")
    args = parser.parse_args(argv)
    variants = ["cpu"]
    reason = None if args.require_cuda else cuda_unavailable_reason()
    if args.cpu_only:
        reason = "--cpu-only was given"
    if reason is None:
        variants.append("cuda")
    for variant in variants:
        try:
            path = ensure_loaded(variant, verbose=args.verbose, force=args.force)
        except BackendUnavailable as err:
            print(f"apl_kernels.build: {variant}: {err}", file=sys.stderr)
            # Without a GPU to run it and unless it was required, a failed CUDA build is reported and
            # the CPU library (built first) stands: nvcc found beside a broken toolkit must not fail it.
            if variant == "cpu" or args.require_cuda or torch.cuda.is_available():
                return 1
            reason = "its build failed (above); no GPU is visible, so the CPU library is enough here"
            continue
        print(f"apl_kernels.build: {variant} library ready: {path}")
    if reason is not None:
        print(f"apl_kernels.build: the CUDA library was not built: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
