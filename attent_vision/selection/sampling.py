"""The teacher's epoch sampler, cut to whole optimizer steps when gradients are accumulated."""

from __future__ import annotations

from attent_vision.data.sampler import SubsetSampler


class WholeStepSampler(SubsetSampler):
    """A :class:`~attent_vision.data.sampler.SubsetSampler` whose epochs hold whole optimizer steps only.

    With ``trainer.accumulate_grad_batches=N`` one optimizer step trains on N batches of B, and Lightning steps
    on an epoch's last batch even when its window is incomplete: that extra, smaller step would make the epoch
    one step longer than the plan and the LR schedule count. Each rank's shard is therefore cut to a multiple
    of B x N (the tail of the epoch's shuffled order, so the samples left out differ every epoch), just as
    incomplete batches are dropped. A run with ``data.batch_size=B/2`` and N=2 then trains, step for step, on
    the samples that ``data.batch_size=B`` without accumulation does.

    Args:
        num_samples: Size of the dataset.
        step_samples: Samples of one rank per optimizer step (B x N; 1 keeps SubsetSampler's length).
        **kwargs: See :class:`~attent_vision.data.sampler.SubsetSampler`.
    """

    def __init__(self, num_samples: int, *, step_samples: int = 1, **kwargs: int) -> None:
        super().__init__(num_samples, **kwargs)
        if step_samples < 1:
            raise ValueError(f"step_samples must be >= 1, got {step_samples}")
        self.step_samples = step_samples

    def __len__(self) -> int:
        per_rank = super().__len__()
        return per_rank - per_rank % self.step_samples
