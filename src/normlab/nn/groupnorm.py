"""``GroupNorm``, drop-in for ``torch.nn.GroupNorm``: per sample, over groups of channels."""
from __future__ import annotations

from torch import Tensor, nn

from .. import functional as F
from ._affine import add_affine, affine_of, reset_affine
from ._overrides import has_torch_function_unary, overridden


class GroupNorm(nn.GroupNorm):  # a torch.nn.GroupNorm to isinstance (see normlab.nn.batchnorm), normlab's methods
    r"""Group normalization (Wu & He, 2018) over an input (N, C, \*).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    with mean and biased variance per sample over each of ``num_groups`` groups of C / G channels (and all
    trailing dimensions), and per-channel γ (ones), β (zeros) when ``affine`` (keyword-only ``bias=False`` drops
    β). No running statistics: training and evaluation compute the same thing, and any batch size works (even 1).

    Example: ``GroupNorm(4, 32)(torch.randn(2, 32, 8, 8))``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, bias: bool = True) -> None:
        nn.Module.__init__(self)  # not torch.nn.GroupNorm's
        if num_groups <= 0 or num_channels % num_groups != 0:
            raise ValueError(f"num_channels must be divisible by num_groups: got num_channels={num_channels} and "
                             f"num_groups={num_groups}; choose num_groups among the divisors of {num_channels}")
        F._check_eps(eps)
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        add_affine(self, num_channels, affine, bias, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        if has_torch_function_unary(input):  # torch.fx's Proxy, a tensor subclass: as torch.nn's layers
            return overridden(self, input)
        if input.dim() >= 2 and input.shape[1] != self.num_channels:
            raise F.NormError(f"GroupNorm({self.num_groups}, {self.num_channels}) got an input with "
                                   f"{input.shape[1]} channels (shape {tuple(input.shape)}); channels are "
                                   f"dimension 1")
        weight, bias = affine_of(self)
        return F.group_norm(input, self.num_groups, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return "{num_groups}, {num_channels}, eps={eps}, affine={affine}, bias={use_bias}".format(
            **self.__dict__, use_bias=self.bias is not None)
