"""Holding some parameters fixed during training in a way DistributedDataParallel accepts.

Why not ``requires_grad_(False)``: nnU-Net wraps the network in ``DistributedDataParallel`` once, in
``initialize``. DDP records which parameters require gradients at that moment and, without
``find_unused_parameters`` (nnU-Net does not set it; it costs a graph traversal every step), waits for a
gradient of each of them in every backward pass: turning ``requires_grad`` off afterwards makes the
next step fail. Turning it off before the wrap would need the wrapper rebuilt at unfreezing, i.e.
re-doing nnU-Net's wrapping (device ids, SyncBatchNorm, torch.compile order) in our code.

Instead every parameter keeps ``requires_grad``; for a frozen one

- a gradient hook replaces its gradient by zeros before it is accumulated, so DDP all-reduces zeros and
  nnU-Net's gradient clipping (norm 12) sees only the trained parameters, as with ``requires_grad=False``;
- :class:`FreezableAdamW` drops its ``.grad`` before stepping, so AdamW leaves it exactly unchanged (no
  weight decay, no moment or step-count update), again as for a parameter without gradient.

The price: the weight gradients of frozen parameters are still computed (the backward pass crosses them
anyway when something below them trains, e.g. Swin-UMamba's patch embedding). The frozen set is part of
the optimizer's state dict, which nnU-Net saves in every checkpoint, so ``--c`` resumes with the same
parameters frozen.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

import torch

__all__ = ["FreezableAdamW", "summarise_names"]


class FreezableAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose :meth:`freeze` holds parameters fixed without touching ``requires_grad``."""

    STATE_KEY = "nnunet_moe_frozen"  # flat parameter indices, in torch's own state-dict order

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self._frozen_hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}

    def _parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def frozen(self) -> list[torch.nn.Parameter]:
        """The frozen parameters, in the optimizer's order."""
        return [p for p in self._parameters() if id(p) in self._frozen_hooks]

    def freeze(self, params: Iterable[torch.nn.Parameter]) -> None:
        known = {id(p) for p in self._parameters()}
        for p in params:
            if id(p) not in known:
                raise ValueError("only parameters this optimizer updates can be frozen")
            if id(p) not in self._frozen_hooks:
                self._frozen_hooks[id(p)] = p.register_hook(torch.zeros_like)

    def unfreeze(self) -> None:
        for handle in self._frozen_hooks.values():
            handle.remove()
        self._frozen_hooks.clear()

    def step(self, closure=None):
        for p in self.frozen:
            p.grad = None  # AdamW skips parameters without a gradient
        return super().step(closure)

    def state_dict(self):
        state = super().state_dict()
        state[self.STATE_KEY] = [i for i, p in enumerate(self._parameters()) if id(p) in self._frozen_hooks]
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        frozen = state_dict.pop(self.STATE_KEY, [])  # absent in plain AdamW states: nothing frozen
        super().load_state_dict(state_dict)
        params = self._parameters()
        self.unfreeze()
        self.freeze(params[i] for i in frozen)


def summarise_names(names: Iterable[str], limit: int = 12) -> str:
    """Parameter names grouped by their pattern (indices as ``*``), e.g.
    ``layers.*.blocks.*.ln_1.weight x15``; at most ``limit`` patterns, in first-seen order."""
    counts = Counter(re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name) for name in names)
    parts = [f"{pattern} x{n}" if n > 1 else pattern for pattern, n in list(counts.items())[:limit]]
    if len(counts) > limit:
        parts.append(f"... {len(counts) - limit} more patterns")
    return ", ".join(parts)
