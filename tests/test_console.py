"""The per-epoch line: every field readable whatever its scale."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from bench.console import epoch_progress


def epoch_line(lr: float, grad_norm_max: float = 1.0, grad_clipped: float = 0.0) -> str:
    out = io.StringIO()
    console = Console(file=out, width=200)
    record = {"train_loss": 1.5, "train_acc": 0.4, "val_loss": 1.4, "val_acc": 0.45, "lr": lr,
              "epoch_seconds": 10.0, "images_per_s": 4500.0, "grad_norm_max": grad_norm_max, "grad_clipped": grad_clipped}
    with epoch_progress(console, 2, 45000) as (_, on_epoch):
        on_epoch(1, record)
    return out.getvalue()


@pytest.mark.parametrize("lr, shown", [(2e-5, "lr 2e-05 "), (2e-3, "lr 0.002 "), (0.0994, "lr 0.0994 "), (0.1, "lr 0.1 ")])
def test_epoch_line_shows_small_learning_rates(lr, shown):
    # AdamW's warm-up starts at lr / 100 (2e-5 for lr 2e-3), which four decimals printed as 0.0000.
    assert shown in epoch_line(lr)


def test_epoch_line_shows_the_epochs_largest_gradient_norm():
    # What to watch for a blow-up of the gated shape's residual stream (docs/convnext.md).
    assert "lr 0.05  grad norm 3.41  10.0s 4,500 img/s" in epoch_line(0.05, grad_norm_max=3.4123)


def test_epoch_line_says_how_many_steps_grad_clip_bound():
    assert "grad norm 3.41 (12% clipped)  10.0s" in epoch_line(0.05, grad_norm_max=3.4123, grad_clipped=0.123)
    assert "grad norm 42 (<1% clipped)  10.0s" in epoch_line(0.05, grad_norm_max=42.0, grad_clipped=1 / 352)  # one spike
    assert "clipped" not in epoch_line(0.05, grad_norm_max=3.0)
