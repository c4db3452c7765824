"""normlab.reference: the executable specification of the normalization family, in NumPy float64.

Nothing here imports torch. Every op is a pair of pure functions side by side::

    y, cache[, new_running] = <op>_forward(x, ...)
    dx, dgamma, dbeta       = <op>_backward(dy, cache)

Inputs are converted to float64 and outputs are float64. Running statistics are *returned* as a
:class:`RunningStats` ``(mean, var, num_batches_tracked)``, never updated in place; the caller (a module, a
test) decides whether to keep them.

Layout (one concept per file)
-----------------------------
``rownorm.py``       The one primitive: normalize the rows of an (M, K) matrix, and its backward; the
                     shifted two-pass :func:`moments` every op uses.
``running.py``       Running-statistics update (momentum as the weight of the new batch, ``None`` =
                     cumulative average, unbiased variance), and the Keras/Flax naming conversion.
``batchnorm.py``     Batch norm for (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W): training and eval
                     forward, a node-by-node graph backward and the closed-form backward.
``layernorm.py``     Layer norm over the trailing ``normalized_shape``: rows = leading indices.
``groupnorm.py``     Group norm: rows = (sample, group) pairs; per-channel affine.
``instancenorm.py``  Instance norm: group norm with G = C, plus optional running statistics (eval mode is
                     batch norm's eval mode).
``gradcheck.py``     Central-difference gradients and :func:`check_grads`, used by the tests for every op and
                     every argument (x, gamma, beta).

Conventions (shared with ``normlab.functional`` and ``normlab.nn``): normalize with the biased variance, store
the unbiased one; ``momentum`` weights the new batch (default 0.1); eps > 0 is added to the variance;
training batch norm with one value per channel raises ``ValueError``; an empty batch gives an empty output and
leaves the running statistics unchanged.
"""
from .batchnorm import BatchNormCache, batch_norm_backward, batch_norm_backward_graph, batch_norm_forward
from .gradcheck import check_grads, numerical_grad, rel_error
from .groupnorm import GroupNormCache, group_norm_backward, group_norm_forward
from .instancenorm import InstanceNormCache, instance_norm_backward, instance_norm_forward
from .layernorm import LayerNormCache, layer_norm_backward, layer_norm_forward
from .rownorm import moments, normalize_rows, normalize_rows_backward
from .running import RunningStats, update_factor, update_running

__all__ = [
    "BatchNormCache", "GroupNormCache", "InstanceNormCache", "LayerNormCache", "RunningStats",
    "batch_norm_backward", "batch_norm_backward_graph", "batch_norm_forward",
    "check_grads", "group_norm_backward", "group_norm_forward", "instance_norm_backward",
    "instance_norm_forward", "layer_norm_backward", "layer_norm_forward", "moments", "normalize_rows",
    "normalize_rows_backward", "numerical_grad", "rel_error", "update_factor", "update_running",
]
