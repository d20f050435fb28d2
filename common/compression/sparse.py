"""A sparse delta for one tensor, shared by the update codecs (common/compression/codecs.py) and the FedBuff
aggregator (coordinator/aggregator.py), which adds it into its dense buffer without densifying it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseTensor:
    """A sparse delta for one tensor: ``values[j]`` is added at flat (row-major) position ``indices[j]``.

    indices: 1-D int64 tensor of flat indices into a tensor of ``shape`` (repeats are summed).
    values: 1-D tensor, same length as ``indices``, of the parameter's dtype.
    shape: the dense tensor's shape.

    The aggregator adds it into its dense buffer with ``index_add_`` and never builds a dense copy. (The
    aggregator recognises any object with ``indices``, ``values`` and ``shape`` attributes.) Nothing is
    validated here: the aggregator validates what it receives, and ``common.compression.codecs.decode`` only builds
    SparseTensors whose indices are sorted, unique and in range.
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]

    def to_dense(self) -> torch.Tensor:
        """The dense tensor (for tests and debugging; the aggregator does not call it)."""
        out = torch.zeros(math.prod(self.shape), dtype=self.values.dtype, device=self.values.device)
        out.index_add_(0, self.indices, self.values)
        return out.reshape(self.shape)
