"""The Triton backend's tests (``triton_backend.py``) in a child process: in Triton's interpreter on CPU, and
compiled on CUDA where a GPU is available.

The interpreter has to be on before triton is first imported and then stays on for the whole process, so these
tests cannot share the main test process (where torch.compile may import triton for itself); the CUDA run gets a
process of its own for the same reason (no interpreter there).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _run_checks(**env_vars) -> None:
    here = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:warnings",
                           str(here / "triton_backend.py")], env=dict(os.environ, **env_vars),
                          capture_output=True, text=True, timeout=900, cwd=here.parent)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


def test_triton_backend_in_the_interpreter():
    # the interpreters of triton 3.0-3.6 (older torch's pins) fail on these kernels (tl.arange; numpy 2.4)
    pytest.importorskip("triton", minversion="3.8")
    _run_checks(TRITON_INTERPRET="1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_backend_compiled_on_cuda():
    pytest.importorskip("triton")
    _run_checks(TRITON_INTERPRET="0", NORMLAB_TRITON_CUDA="1")


def test_cpu_work_never_imports_triton():
    """The automatic choice looks for Triton only on a CUDA tensor: CPU layers never pay for importing it."""
    code = ("import sys, torch, normlab\n"
            "m = normlab.BatchNorm2d(3); x = torch.randn(4, 3, 5, 5, requires_grad=True)\n"
            "m(x).sum().backward(); m.eval(); m(x)\n"
            "normlab.kernels.backend_for(x)\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("first", ["gpu_triton_gn", "gpu_triton"])
def test_either_triton_module_imports_first(first):
    """The group-norm kernels' module imports the batch-norm one's helpers, which hands out its functions: either
    can be imported first (in the interpreter: no GPU is needed to define the kernels)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    code = (f"import importlib; importlib.import_module('normlab.kernels.{first}')\n"
            "from normlab.kernels import gpu_triton as T, gpu_triton_gn as G\n"
            "assert T.gn_forward is G.gn_forward and T.gn_backward is G.gn_backward\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_automatic_choice_on_cuda_devices(monkeypatch):
    """Which CUDA devices the automatic choice sends to the Triton kernels: NVIDIA of compute capability 7.0 and
    later, not ROCm builds, not older GPUs (device properties faked: no GPU is needed)."""
    from types import SimpleNamespace

    from normlab import kernels
    sentinel = object()

    def fake_load():
        kernels._triton = sentinel
        return sentinel
    monkeypatch.setattr(kernels, "_load_triton", fake_load)
    monkeypatch.setattr(kernels, "_triton", None)
    monkeypatch.setattr(kernels, "_triton_missing", False)
    x = SimpleNamespace(device=SimpleNamespace(index=0))
    for hip, capability, takes in ((None, (9, 0), True), (None, (7, 0), True), (None, (6, 1), False),
                                   ("6.2", (9, 4), False)):
        monkeypatch.setattr(kernels, "_triton_devices", {})
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, c=capability: c)
        assert (kernels._triton_for(x) is sentinel) == takes, (hip, capability)


def test_launches_run_on_the_tensors_device(monkeypatch):
    """The Triton entry points switch to the input's CUDA device when another one is current (Triton launches on
    the current device), and leave it alone otherwise (device calls faked: no GPU is needed)."""
    from types import SimpleNamespace
    pytest.importorskip("triton", minversion="3.6")
    from normlab.kernels import gpu_triton
    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    launch = gpu_triton._on_device_of(1)(lambda dy, x: "ran")
    for index, switches in ((0, False), (1, True)):
        entered.clear()
        x = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=index))
        assert launch(None, x) == "ran"
        assert entered == ([x.device] if switches else [])
