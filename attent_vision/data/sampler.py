"""Epoch sampler over a pool of dataset indices (the teacher's subset, or the whole set), sharded across ranks,
reshuffled per (seed, epoch) and able to resume an epoch part-way."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Sampler

from attent_vision.seeds import stream_seed


class SubsetSampler(Sampler[int]):
    """Yields this rank's share of the epoch's pool, reshuffled every epoch.

    Every rank holds the same pool and draws the same permutation (the ``shuffle`` seed stream keyed by ``seed``
    and the epoch, never by rank); rank r then takes positions ``r, r + W, r + 2W, ...`` of the first ``W * floor(len / W)`` shuffled
    entries. Shards are therefore equal-sized and disjoint, and their union is the pool (the teacher sizes
    subsets as multiples of W; a full epoch over M samples leaves out ``M mod W`` of them, different ones each
    epoch).

    Args:
        num_samples: Size of the dataset; the pool starts as all of it.
        seed: Shuffling seed shared by all ranks.
        num_replicas: World size W.
        rank: This process's rank.
    """

    def __init__(self, num_samples: int, *, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.num_samples = num_samples
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.pool = torch.arange(num_samples, dtype=torch.int64)
        self._skip = 0
        self._pending_skip: tuple[int, int] | None = None

    def set_pool(self, indices: Tensor) -> None:
        """Use ``indices`` (int64 dataset indices) as the pool of the coming epochs."""
        if indices.dtype != torch.int64:
            raise TypeError(f"pool indices must be int64, got {indices.dtype}")
        if indices.numel() < self.num_replicas:
            raise ValueError(
                f"a pool of {indices.numel()} samples cannot be split over {self.num_replicas} ranks"
            )
        self.pool = indices.clone()

    def set_full(self) -> None:
        self.pool = torch.arange(self.num_samples, dtype=torch.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self._pending_skip is not None and self._pending_skip[0] == epoch:
            self.skip_next(self._pending_skip[1])
            self._pending_skip = None

    def skip_in_epoch(self, epoch: int, num_samples: int) -> None:
        """Leave out the first ``num_samples`` of this rank's shard when epoch ``epoch`` is iterated (resuming it
        part-way). Armed by ``set_epoch(epoch)``, which Lightning calls right before the epoch's iteration, so a
        loader that is iterated earlier (Lightning's set-up checks) does not use it up."""
        self._pending_skip = (epoch, num_samples)

    def skip_next(self, num_samples: int) -> None:
        """Leave out the first ``num_samples`` of this rank's shard in the next iteration only (resuming an epoch
        part-way: the loader length stays the epoch's, as Lightning's batch counters expect)."""
        self._skip = max(0, num_samples)

    def epoch_order(self) -> Tensor:
        """The epoch's global order (identical on every rank), truncated to a multiple of the world size."""
        generator = torch.Generator().manual_seed(stream_seed("shuffle", self.seed, self.epoch))
        order = self.pool[torch.randperm(self.pool.numel(), generator=generator)]
        return order[: len(self) * self.num_replicas]

    def shard(self) -> Tensor:
        """This rank's indices for the epoch."""
        return self.epoch_order()[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(self.shard()[skip:].tolist())

    def __len__(self) -> int:
        return self.pool.numel() // self.num_replicas
