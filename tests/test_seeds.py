"""Named seed streams (attent_vision.seeds): independence between uses, vectorised = scalar, and their users."""

from __future__ import annotations

import pytest
import torch

from attent_vision import seeds
from attent_vision.selection import SubsetSampler


def test_augmentation_and_training_masks_of_a_sample_start_from_different_seeds():
    """They used to be the same integer, ((seed * 1_000_003 + epoch) * 1_000_033 + index)."""
    index = torch.arange(64)
    augmentation = torch.tensor([seeds.item_seed("augmentation", 0, 3, index=i) for i in range(64)])
    masks = seeds.item_seeds("train_mask", 0, 3, index=index)
    assert not torch.isin(masks, augmentation).any()
    first_draws = [
        torch.rand(1, generator=torch.Generator().manual_seed(int(s))).item()
        for s in (augmentation[5], masks[5])
    ]
    assert first_draws[0] != first_draws[1]


@pytest.mark.parametrize("stream", sorted(seeds.STREAMS))
def test_vectorised_seeds_equal_scalar_seeds_and_fit_a_generator(stream):
    index = torch.tensor([0, 1, 2, 97, 4096, 2**40, 2**62], dtype=torch.int64)
    vector = seeds.item_seeds(stream, 11, 4, index=index)
    assert vector.dtype == torch.int64
    assert vector.tolist() == [seeds.item_seed(stream, 11, 4, index=int(i)) for i in index]
    assert (vector >= 0).all() and vector.unique().numel() == index.numel()
    torch.Generator().manual_seed(int(vector.max()))  # non-negative 63-bit: accepted as is


def test_every_key_changes_the_seed_and_the_same_keys_repeat_it():
    base = seeds.stream_seed("selection", 0, 1, 5)
    assert seeds.stream_seed("selection", 0, 1, 5) == base
    others = {
        seeds.stream_seed("selection", 1, 1, 5),
        seeds.stream_seed("selection", 0, 2, 5),
        seeds.stream_seed("selection", 0, 1, 6),
        seeds.stream_seed("shuffle", 0, 1, 5),
        seeds.stream_seed("selection", 0, -1, 5),  # "no cycle" is a key of its own
    }
    assert base not in others and len(others) == 5
    per_epoch = seeds.item_seeds("train_mask", 0, 0, index=torch.arange(100))
    next_epoch = seeds.item_seeds("train_mask", 0, 1, index=torch.arange(100))
    assert not torch.isin(per_epoch, next_epoch).any()


def test_unknown_stream_is_refused():
    with pytest.raises(ValueError, match="unknown seed stream 'dropout'"):
        seeds.stream_seed("dropout", 0)


def test_the_sampler_shuffles_from_the_shuffle_stream():
    sampler = SubsetSampler(50, seed=7)
    sampler.set_epoch(3)
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(seeds.stream_seed("shuffle", 7, 3)))
    assert torch.equal(sampler.epoch_order(), expected)


def test_seeded_augmentation_draws_from_the_augmentation_stream():
    from attent_vision.data.datamodule import SeededAugmentation

    class Draw(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            return torch.rand(1).item()  # what torchvision's random transforms do: the default generator

    augmented = SeededAugmentation(Draw(), seed=2)
    want = torch.rand(
        1, generator=torch.Generator().manual_seed(seeds.item_seed("augmentation", 2, 4, index=6))
    )
    assert augmented[(6, 4)] == want.item()


def test_the_pretraining_module_draws_masks_from_their_streams(compose_cfg):
    import hydra

    cfg = compose_cfg("experiment=smoke")
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    index = torch.tensor([3, 1, 4])
    assert torch.equal(
        module.train_mask_seeds(index), seeds.item_seeds("train_mask", cfg.seed, 0, index=index)
    )
    # validation masks use their own stream and a fixed key, not the run's seed: comparable across runs
    assert module.val_mask_seed != cfg.seed
