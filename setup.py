# Metadata lives in pyproject.toml. This file exists for the build design the README explains:
# `pip install .` ships the C++/CUDA sources (csrc/) inside the package, and they are compiled
# against the torch that imports them, never against a torch of pip's build environment.
from setuptools import setup

setup()
