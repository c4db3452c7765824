"""``LayerNorm``, drop-in for ``torch.nn.LayerNorm``: per sample, over the trailing dimensions."""
from __future__ import annotations

import numbers

from torch import Tensor, nn

from .. import functional as F
from ._affine import add_affine, affine_of, reset_affine
from ._overrides import has_torch_function_unary, overridden


class LayerNorm(nn.LayerNorm):  # a torch.nn.LayerNorm to isinstance (see normlab.nn.batchnorm), normlab's methods
    r"""Layer normalization (Ba, Kiros & Hinton, 2016) over the last ``len(normalized_shape)`` dimensions.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \odot \gamma + \beta

    with mean and biased variance per leading index, elementwise γ (ones) and β (zeros) of shape
    ``normalized_shape`` when ``elementwise_affine`` (``bias=False`` drops β). No running statistics.

    Example: ``LayerNorm(512)(torch.randn(8, 20, 512))``.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None) -> None:
        nn.Module.__init__(self)  # not torch.nn.LayerNorm's
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        F._check_eps(eps)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        add_affine(self, self.normalized_shape, elementwise_affine, bias, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        if has_torch_function_unary(input):  # torch.fx's Proxy, a tensor subclass: as torch.nn's layers
            return overridden(self, input)
        weight, bias = affine_of(self)
        return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}, bias={use_bias}".format(
            **self.__dict__, use_bias=self.bias is not None)
