"""One way to derive every seed of a run: named streams on ``numpy.random.SeedSequence``.

Each random use has its own stream, so two uses never share a seed even when they are keyed by the same numbers
(a sample's augmentation and its training mask in one epoch used to start from the same integer):

=============== ============================ ===========================================================
stream          keyed by                     draws
=============== ============================ ===========================================================
``selection``   seed, epoch, cycle           the teacher's subset / pruning generator (never the rank)
``shuffle``     seed, epoch                  the epoch order of the teacher's sampler
``augmentation`` seed, epoch, sample index   the random crop and flip of a training sample
``train_mask``  seed, epoch, sample index    the MultiMAE mask of a training sample
``score_mask``  seed, sample index           the mask of a sample in a reproducible scoring pass
``val_mask``    seed, sample index           the mask of a validation sample (fixed across epochs)
=============== ============================ ===========================================================

A stream's base is ``SeedSequence(seed, spawn_key=(stream id, *keys))`` — SeedSequence's own way of naming
independent children. Per-sample seeds then mix the index into that 64-bit base with SplitMix64's finaliser, a
cheap bijection: vectorised over a batch (``item_seeds``) or one Python integer at a time (``item_seed``), so a
batch costs one SeedSequence call, not one per sample. All seeds are non-negative 63-bit integers, which
``torch.Generator.manual_seed`` and ``numpy`` accept as they are.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

STREAMS: dict[str, int] = {
    "selection": 1,
    "shuffle": 2,
    "augmentation": 3,
    "train_mask": 4,
    "score_mask": 5,
    "val_mask": 6,
}

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_NP_GAMMA, _NP_MIX1, _NP_MIX2 = np.uint64(_GAMMA), np.uint64(_MIX1), np.uint64(_MIX2)
_ONE, _S27, _S30, _S31 = np.uint64(1), np.uint64(27), np.uint64(30), np.uint64(31)


def _stream_id(stream: str) -> int:
    try:
        return STREAMS[stream]
    except KeyError:
        raise ValueError(f"unknown seed stream {stream!r}; known: {', '.join(STREAMS)}") from None


@lru_cache(maxsize=4096)
def stream_base(stream: str, seed: int, *keys: int) -> int:
    """64-bit base of ``stream`` for (seed, *keys); cached, since a run asks for few distinct keys."""
    key = (_stream_id(stream), *(k & _MASK64 for k in keys))
    state = np.random.SeedSequence(seed & _MASK64, spawn_key=key).generate_state(1, np.uint64)
    return int(state[0])


def stream_seed(stream: str, seed: int, *keys: int) -> int:
    """A non-negative 63-bit seed for one generator of ``stream`` keyed by (seed, *keys)."""
    return stream_base(stream, seed, *keys) >> 1


def _splitmix(value: int) -> int:
    z = value & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def item_seed(stream: str, seed: int, *keys: int, index: int) -> int:
    """The seed of one sample ``index`` in ``stream`` (keyed by seed and ``keys``); about 1 µs per call."""
    return _splitmix(stream_base(stream, seed, *keys) + (index + 1) * _GAMMA) >> 1


def item_seeds(stream: str, seed: int, *keys: int, index: Tensor) -> Tensor:
    """Per-sample seeds (B,) int64 on the CPU for the dataset indices ``index``, equal to :func:`item_seed`."""
    base = np.uint64(stream_base(stream, seed, *keys))
    # Array arithmetic on uint64 wraps modulo 2^64 without warnings, as SplitMix64 intends.
    z = (index.detach().cpu().numpy().astype(np.uint64) + _ONE) * _NP_GAMMA + base
    z = (z ^ (z >> _S30)) * _NP_MIX1
    z = (z ^ (z >> _S27)) * _NP_MIX2
    z = z ^ (z >> _S31)
    return torch.from_numpy((z >> _ONE).astype(np.int64))
