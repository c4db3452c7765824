"""``normlab bench``: normlab's batch norm against torch.nn, torch.compile and a from-scratch version.

Everything runs in one process, one after the other, on the same tensors:

* ``normlab``  -- :class:`normlab.BatchNorm2d` (etc.), numba kernels on CPU;
* ``torch``    -- :class:`torch.nn.BatchNorm2d` eager;
* ``compile``  -- ``torch.compile`` of the composite formula (mean, biased var, rsqrt, affine, buffer update);
* ``scratch``  -- the d2l-style from-scratch layer: autograd through ``mean``, ``var`` and ``sqrt``.

Modes: training forward (autograd recording, as in a training step), forward + backward, eval forward.
Each number is the median of many repeats after warm-up (``--budget`` seconds per measurement), the contenders
taking turns call by call; ``won`` is the fraction of those rounds in which normlab's call beat torch's. Bandwidth
is the minimum traffic of a pass (forward 2 reads + 1 write, backward 4 reads + 1 write, eval 1 read + 1 write)
divided by the time, as a fraction of the bandwidth of a copy (``dst.copy_(x)``, read + write) of the same tensor
timed as one more contender in the same rotation -- so a tensor that fits in the last-level cache in part is
compared with a copy that found the caches in the same states (see :func:`timeit_with_copy`). The copy bandwidth of
a 512 MiB tensor (DRAM) is measured first and reported in the header; the summary gives the median fraction of both.
Saved-for-backward memory is counted with ``torch.autograd.graph.saved_tensors_hooks``.

Other sections: fused BN+ReLU (and sigmoid) vs BN then the activation; GroupNorm / LayerNorm vs torch; the whole
LeNet-BN training step (d2l's network) in examples per second; ``roof``: how fast any batch norm could be on this
machine, and so the largest ratio over torch any could reach (see :func:`roof_bound`); where CUDA is available,
normlab's Triton kernels against torch.nn on the GPU, eager with a synchronization after every call (``gpu``) and
with the host taken out by a CUDA graph (``gpu_graph``, :func:`time_graph`). ``--json PATH`` writes every number.

The package: :mod:`.timing` (how a number is taken), :mod:`.contenders` (the layers besides normlab's and torch's),
:mod:`.suite` (the sections and their shapes), :mod:`.report` (table, summary, machine), :mod:`.cli` (``normlab
bench``), :mod:`.plot` (``normlab bench-plot``, figures of ``--json`` runs).
"""
from __future__ import annotations

from .cli import register, run
from .contenders import AutogradFloor, CompositeBatchNorm, ScratchBatchNorm, lenet, make_layer
from .report import TARGETS, machine_info, render, render_targets, summarize, targets, targets_over_runs
from .suite import (DEFAULT_SECTIONS, DEFAULT_SHAPES, IMPLS, MIN_PASSES, MODES, QUICK_SHAPES, SECTIONS, Row,
                    bench_fused, bench_gpu, bench_groupnorm, bench_layers, bench_lenet, bench_roof, modes_for,
                    parse_shape, roof_bound)
from .timing import (COPY, STAT, copy_bandwidth, round_orders, rounds_won, saved_bytes, settle_allocator, synced,
                     time_graph, timeit, timeit_interleaved, timeit_with_copy)

__all__ = ["register", "run", "AutogradFloor", "CompositeBatchNorm", "ScratchBatchNorm", "lenet", "make_layer",
           "TARGETS", "machine_info", "render", "render_targets", "summarize", "targets", "targets_over_runs",
           "DEFAULT_SECTIONS", "DEFAULT_SHAPES", "IMPLS", "MIN_PASSES", "MODES", "QUICK_SHAPES", "SECTIONS", "Row",
           "bench_fused", "bench_gpu", "bench_groupnorm", "bench_layers", "bench_lenet", "bench_roof", "modes_for",
           "parse_shape", "roof_bound", "COPY", "STAT", "copy_bandwidth", "round_orders", "rounds_won", "saved_bytes",
           "settle_allocator", "synced", "time_graph", "timeit", "timeit_interleaved", "timeit_with_copy"]
