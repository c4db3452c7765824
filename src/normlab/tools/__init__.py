"""Practitioner tools for models with batch norms.

* :func:`fold_bn`: fold every BatchNorm into the conv/linear before it, for inference (with a report);
  :func:`fold_speedup` times the folded model against the original.
* :func:`recompute_bn_stats`: precise BN, running statistics = population statistics over given batches.
* :func:`adapt_bn`: AdaBN, running statistics re-estimated on a target domain.
* :func:`freeze_bn` / :func:`unfreeze_bn`: keep batch norms in evaluation behaviour, gamma/beta fixed.
* :func:`convert`: torch.nn <-> normlab layers, or one norm type for another (BN -> GN, BN -> Frozen, ...).
* :func:`doctor`: a report of common batch-norm misuse.

All of them accept torch.nn and normlab batch norms alike.
"""
from .convert import convert
from .doctor import DoctorReport, Finding, doctor
from .fold import FoldReport, fold_bn, fold_into, fold_speedup, time_inference
from .freeze import freeze_bn, is_frozen, unfreeze_bn
from .stats import ChannelMoments, adapt_bn, recompute_bn_stats

__all__ = ["fold_bn", "fold_into", "FoldReport", "fold_speedup", "time_inference", "recompute_bn_stats", "adapt_bn",
           "ChannelMoments", "freeze_bn", "unfreeze_bn", "is_frozen", "convert", "doctor", "DoctorReport", "Finding"]
