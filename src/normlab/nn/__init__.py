"""Modules: parameters, buffers and policy only; the math lives in ``normlab.functional``."""
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .groupnorm import GroupNorm
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layernorm import LayerNorm
from .switchnorm import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d
from .batchrenorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .ghostbatchnorm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .frozenbatchnorm import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .syncbatchnorm import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "LayerNorm", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
           "SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
           "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
           "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "SyncBatchNorm"]
