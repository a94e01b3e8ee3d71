"""Ω = 1 for every trainable parameter: the L2 baseline (the same pull towards the anchors everywhere)."""

import torch
from torch import Tensor

from ..distributed import as_shard_of, local_tensor
from ._loop import ImportanceMethod


class Uniform(ImportanceMethod):
    """No data, no pass over the model: `finalize` alone gives Ω."""

    name = "uniform"
    needs_data = False

    def finalize(self, sums: dict[str, Tensor], count: int) -> dict[str, Tensor]:
        return {
            n: as_shard_of(torch.ones_like(local_tensor(p), dtype=torch.float32), p) for n, p in self.params.items()
        }
