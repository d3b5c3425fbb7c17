"""Learning-rate schedules stepped per epoch, the way nnU-Net steps its PolyLRScheduler."""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import _LRScheduler


def warmup_cosine_lr(epoch: int, initial_lr: float, max_epochs: int, warmup_epochs: int) -> float:
    """Linear warm-up to ``initial_lr`` over ``warmup_epochs``, then cosine decay to 0 at ``max_epochs``.

    >>> warmup_cosine_lr(0, 1.0, 10, 0), warmup_cosine_lr(5, 1.0, 10, 0)
    (1.0, 0.5)
    """
    if max_epochs < 1 or not 0 <= warmup_epochs < max_epochs:
        raise ValueError(f"warm-up cosine schedule needs 0 <= warmup_epochs ({warmup_epochs}) < max_epochs ({max_epochs})")
    if epoch < warmup_epochs:
        return initial_lr * (epoch + 1) / (warmup_epochs + 1)
    progress = (epoch - warmup_epochs) / (max_epochs - warmup_epochs)
    return 0.5 * initial_lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class WarmupCosineLRScheduler(_LRScheduler):
    """Per-epoch warm-up + cosine schedule with nnU-Net's ``step(current_epoch)`` protocol."""

    def __init__(self, optimizer, initial_lr: float, max_epochs: int, warmup_epochs: int, current_step: int = None):
        self.initial_lr, self.max_epochs, self.warmup_epochs = initial_lr, max_epochs, warmup_epochs
        warmup_cosine_lr(0, initial_lr, max_epochs, warmup_epochs)  # validates the arguments
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = warmup_cosine_lr(current_step, self.initial_lr, self.max_epochs, self.warmup_epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr
