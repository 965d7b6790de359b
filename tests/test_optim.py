import math
from itertools import pairwise

import pytest

from attent_vision.lightning.optim import warmup_cosine_lr


def test_warmup_rises_linearly_then_cosine_lands_on_min_lr():
    total, warmup, base, low = 100, 10, 1e-3, 1e-5
    lrs = [
        warmup_cosine_lr(i, base_lr=base, min_lr=low, warmup_steps=warmup, total_steps=total)
        for i in range(total)
    ]
    assert lrs[0] == pytest.approx(base / warmup)
    assert lrs[warmup - 1] == pytest.approx(base)
    assert all(b > a for a, b in pairwise(lrs[:warmup]))
    assert lrs[warmup] == pytest.approx(base)
    assert all(b <= a for a, b in pairwise(lrs[warmup:]))
    assert lrs[-1] == pytest.approx(low)
    mid = warmup + (total - 1 - warmup) / 2
    assert warmup_cosine_lr(int(mid), base_lr=base, min_lr=low, warmup_steps=warmup, total_steps=total) == (
        pytest.approx(
            low + 0.5 * (base - low) * (1 + math.cos(math.pi * (int(mid) - warmup) / (total - 1 - warmup)))
        )
    )


def test_steps_past_the_end_stay_at_min_lr_and_bad_totals_raise():
    assert warmup_cosine_lr(500, base_lr=1.0, min_lr=0.1, warmup_steps=5, total_steps=50) == pytest.approx(
        0.1
    )
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine_lr(0, base_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=0)
