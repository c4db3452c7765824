"""The Triton backend's tests (``triton_interpreted.py``) in a child process with Triton's interpreter on.

The interpreter has to be on before triton is first imported and then stays on for the whole process, so these
tests cannot share the main test process (where torch.compile may import triton for itself).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# the interpreters of triton 3.0-3.6 (older torch's pins) fail on these kernels (tl.arange; numpy 2.4)
pytest.importorskip("triton", minversion="3.8")


def test_triton_backend_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:warnings",
                           str(here / "triton_interpreted.py")], env=env, capture_output=True, text=True,
                          timeout=900, cwd=here.parent)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
