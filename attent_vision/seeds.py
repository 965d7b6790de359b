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
independent children. Per-sample seeds then mix the index into that 64-bit base with SplitMix64's finaliser
(:func:`splitmix64`, a cheap bijection), vectorised over a batch (``item_seeds``), so a batch costs one SeedSequence
call, not one per sample. All seeds are non-negative 63-bit integers, which ``torch.Generator.manual_seed`` and
``numpy`` accept as they are. The masks' counter-based draws (:mod:`attent_vision.models.counter_rng`) hash with the
same :func:`splitmix64`: it is written once, here.

The process-wide generators (torch, CUDA, numpy, Python) are not derived from streams: dropout, drop-path, mixup
and reference-mode masks draw from them. :func:`capture_rng_state` / :func:`restore_rng_state` put their states
into checkpoints (the teacher's and the run-level ``RngStateCapture``'s) so a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any

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


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return value - (1 << 64) if value >= 1 << 63 else value


GAMMA = _signed(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio), as int64 bits
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic on signed integers)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(z: Tensor) -> Tensor:
    """SplitMix64's finaliser, elementwise on int64 tensors read as uint64 bits (wrapping arithmetic)."""
    z = (z ^ shift_right(z, 30)) * _MIX1
    z = (z ^ shift_right(z, 27)) * _MIX2
    return z ^ shift_right(z, 31)


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


def item_seed(stream: str, seed: int, *keys: int, index: int) -> int:
    """The seed of one sample ``index`` in ``stream`` (keyed by seed and ``keys``), as :func:`item_seeds` gives it."""
    return int(item_seeds(stream, seed, *keys, index=torch.tensor([index]))[0])


def item_seeds(stream: str, seed: int, *keys: int, index: Tensor) -> Tensor:
    """Per-sample seeds (B,) int64 on the CPU for the dataset indices ``index``."""
    base = _signed(stream_base(stream, seed, *keys))
    z = (index.detach().cpu().long() + 1) * GAMMA + base  # [B], wrapping modulo 2^64 as SplitMix64 intends
    return shift_right(splitmix64(z), 1)


def capture_rng_state() -> dict[str, Any]:
    """The process-wide RNG states as plain tensors and numbers that load with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Sets the process-wide generators to what :func:`capture_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["name"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    random.setstate(state["python"])
