"""Inputs that are not plain tensors, handed over where torch.nn's norm layers hand them over.

* torch.fx's symbolic tracer records a module of ``torch.nn`` as one ``call_module`` node and traces through any
  other module's ``forward`` with symbolic values (Proxies). A norm layer's forward checks shapes in Python, which
  a Proxy cannot decide (``TraceError: symbolically traced variables cannot be used as inputs to control flow``):
  normlab's layers put the same ``call_module`` node in the graph, and the GraphModule calls the layer itself
  when it runs (torchvision's feature extraction, FX graph passes, ``torch.fx.symbolic_trace``).
* A tensor subclass with ``__torch_function__`` (a logging tensor, a tensor carrying metadata): torch.nn's layers
  call torch.nn.functional, which hands the call to the subclass; normlab's layers hand over their forward, which
  then runs on the subclass's values with its handling disabled, and the subclass's default handling gives the
  result its type back, as torch.nn's layers' results have it.

(A subclass with ``__torch_dispatch__`` goes on to the layer, whose functional hands it to torch.nn.functional:
:func:`normlab.kernels.dispatched`.)
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.fx import Proxy
from torch.overrides import handle_torch_function, has_torch_function_unary

__all__ = ["has_torch_function_unary", "overridden"]


def overridden(module: nn.Module, input: Proxy | Tensor):
    """``module(input)`` for an ``input`` that :func:`has_torch_function_unary`: the ``call_module`` node of
    ``module`` in the graph a Proxy's tracer is building, or the forward handed to a subclass's
    ``__torch_function__``."""
    if isinstance(input, Proxy):
        tracer = input.tracer
        return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), {})
    return handle_torch_function(type(module).forward, (input,), module, input)
