"""Hand a modality to ``network(x)`` calls made by code that does not know about it (nnU-Net's steps and predictor).

M4oE's networks take ``forward(x, modality=None)`` (``(B,)`` expert indices). nnU-Net's ``train_step``,
``validation_step`` and sliding-window predictor call ``network(x)``; a forward pre-hook adds the keyword.
One :class:`ModalityKeyword` per network, attached on first use and removed by :meth:`remove`:

- ``set(indices)``: ``(B,)`` indices for the next calls (a batch of cases);
- ``set(i)``: one expert index for every sample of every call (one modality, any batch size);
- ``set(None)``: calls pass unchanged (the network's own ``modality=None`` behaviour).

A call that already passes a modality (second positional argument or keyword) is left alone.
"""
from __future__ import annotations

import torch

from nnunet_moe.networks.unwrap import unwrap_network

__all__ = ["ModalityKeyword"]


class ModalityKeyword:
    def __init__(self, network: torch.nn.Module) -> None:
        self.module = unwrap_network(network)  # hooks on the module itself also fire through DDP / compile
        self.value = None
        self._handle = None

    def set(self, value) -> None:
        self.value = value
        if value is not None and self._handle is None:
            self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        self.value = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, args, kwargs):
        if self.value is None or len(args) > 1 or "modality" in kwargs:
            return None
        x = args[0]
        if isinstance(self.value, int):
            modality = torch.full((x.shape[0],), self.value, dtype=torch.long, device=x.device)
        else:
            modality = self.value.to(x.device)
        return args, {**kwargs, "modality": modality}
