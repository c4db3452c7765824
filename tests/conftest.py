"""Shared fixtures."""
from __future__ import annotations

import os
import shutil

import pytest

import normlab


def native_buildable() -> bool:
    """Whether the native glue is loaded or can be built here (a C++ compiler): the tests of ``"native"`` skip
    only where there is no compiler at all; a failing build fails them."""
    return normlab.kernels._native is not None or shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture
def backend_ctx():
    """``backend_ctx(name)``: :func:`normlab.kernels.use_backend`, skipping ``"native"`` where nothing can
    compile it."""
    def enter(name):
        if name == "native" and not native_buildable():
            pytest.skip("no C++ compiler: the native glue cannot be built here")
        return normlab.kernels.use_backend(name)
    return enter
