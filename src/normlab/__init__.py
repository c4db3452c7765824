"""normlab: batch normalization and its family.

* ``normlab.reference``: NumPy forward/backward, the executable specification (no torch).
* ``normlab.kernels``: statistics / normalize / backward on tensors (numba on CPU, portable torch elsewhere).
* ``normlab.functional``: ``batch_norm``, ``layer_norm``, ``group_norm``, ``instance_norm`` with
  ``torch.nn.functional``'s signatures and closed-form backward.
* ``normlab.nn``: drop-in modules (``BatchNorm2d`` ...), same arguments, buffers and state_dict keys as torch.nn.
* ``normlab.tools``: fold, recompute statistics, adapt, freeze, convert, doctor.
* ``normlab.lab``: Fashion-MNIST experiments (``normlab train``, ``normlab experiment``).
"""
from . import functional, nn
from .nn import *  # noqa: F401,F403
from .nn import __all__ as _nn_all
from .registry import create_norm, list_norms, register_norm

__version__ = "0.1.0"
__all__ = ["functional", "nn", *_nn_all, "create_norm", "register_norm", "list_norms"]
