"""torch.fx symbolic tracing: normlab's norm layers are leaves of the graph, as torch.nn's are.

FX's default tracer records a module of ``torch.nn`` as one ``call_module`` node and traces through any other
module's ``forward`` with symbolic values (Proxies). A norm layer's forward checks shapes in Python, which a Proxy
cannot decide (``TraceError: symbolically traced variables cannot be used as inputs to control flow``), so each
layer's forward first hands a Proxy to :func:`leaf_node`: the graph gets the same ``call_module`` node as for
torch.nn's layer, and the GraphModule calls the layer itself when it runs (torchvision's feature extraction, FX
graph surgery, ``torch.fx.symbolic_trace``).
"""
from __future__ import annotations

from torch import nn
from torch.fx import Proxy

__all__ = ["Proxy", "leaf_node"]


def leaf_node(module: nn.Module, input: Proxy) -> Proxy:
    """The ``call_module`` node of ``module`` applied to ``input`` in the graph ``input``'s tracer is building."""
    tracer = input.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), {})
