"""Reusable scratch memory of the pure-PyTorch selective scan (Gu & Dao, "Mamba", arXiv:2312.00752).

The chunked scan writes its full-size intermediates, ``(Bt, G, Dg, N, nc, T)`` per block of positions
(about 8 MB in float32), in place into two flat buffers. Fresh multi-MB tensors page-fault on the CPU
(they tripled the cost of each pass over a 50 MB tensor on the CPU we measured), so on the CPU each
thread keeps its :class:`ScanWorkspace` between calls (:meth:`ScanWorkspace.for_thread`; buffers above
``WORKSPACE_CACHE_LIMIT_BYTES`` are not kept; :func:`clear_workspace` releases them). On other devices
every request is a fresh tensor: the CUDA caching allocator already reuses memory without page faults.
"""
from __future__ import annotations

import math
import threading

import torch

__all__ = ["ScanWorkspace", "clear_workspace", "WORKSPACE_CACHE_LIMIT_BYTES"]

# Buffers above this size are not kept between calls.
WORKSPACE_CACHE_LIMIT_BYTES = 256 * 2 ** 20


class ScanWorkspace:
    """Two flat scratch buffers of one dtype and device, named by their role in a block of the scan:

    - ``decays``: the block's per-position decays ``E_l`` (written by ``chunk_states``); once the block's
      states are formed the decays are spent, and the same memory takes the block's products
      (``h * C`` in the forward, the adjoint products in the backward).
    - ``states``: the block's states ``h`` (the backward: adjoint states ``g``), written by
      ``chunk_states`` when the caller does not keep the states in a tensor of its own.

    Before and after the blocks both are free, and the ``(B, D_in, L)`` temporaries of the softplus of
    delta (both) and of the silu gate (``decays``) use them. All views of one role share its memory:
    each request overwrites what the previous view of that role held. A buffer grows to the largest
    request (kept only below ``WORKSPACE_CACHE_LIMIT_BYTES``, and only when ``keep``).
    """

    def __init__(self, dtype: torch.dtype, device: torch.device, keep: bool) -> None:
        self.dtype, self.device, self.keep = dtype, torch.device(device), keep
        self._buffers: dict[str, torch.Tensor] = {}

    @classmethod
    def for_thread(cls, dtype: torch.dtype, device: torch.device) -> ScanWorkspace:
        """The calling thread's workspace for ``dtype`` on the CPU (a new one replaces it when the dtype
        changes); on other devices a workspace that keeps nothing."""
        device = torch.device(device)
        if device.type != "cpu":
            return cls(dtype, device, keep=False)
        cached = _THREAD.workspace
        if cached is None or cached.dtype != dtype or cached.device != device:
            cached = _THREAD.workspace = cls(dtype, device, keep=True)
        return cached

    def decays(self, shape) -> torch.Tensor:
        """A contiguous ``shape`` view of the ``decays`` buffer."""
        return self._view("decays", shape)

    def states(self, shape) -> torch.Tensor:
        """A contiguous ``shape`` view of the ``states`` buffer."""
        return self._view("states", shape)

    def _view(self, role: str, shape) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=self.dtype, device=self.device)
            if self.keep and numel * buffer.element_size() <= WORKSPACE_CACHE_LIMIT_BYTES:
                self._buffers[role] = buffer
        return buffer[:numel].view(shape)


class _ThreadWorkspace(threading.local):
    workspace: ScanWorkspace | None = None


_THREAD = _ThreadWorkspace()


def clear_workspace() -> None:
    """Release the calling thread's cached scratch buffers of the selective scan."""
    _THREAD.workspace = None
