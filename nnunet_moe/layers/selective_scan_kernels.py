"""The chunked selective scan over a whole sequence, in blocks of positions, with a hand-written backward.

Reference: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv:2312.00752 (the S6 recurrence ``h_l = exp(delta_l A) h_{l-1} + delta_l B_l u_l``, ``y_l = <C_l, h_l>``).

Grouped 5-D layout (channel ``d`` of group ``g`` at ``(g, d)``; ``Bt`` batch, ``G`` groups of ``Dg``
channels, ``N`` states, ``L`` positions): ``delta5, u5: (Bt, G, Dg, 1, L)``, ``a5: (1, G, Dg, N, 1)``,
``b_mat, c_mat: (Bt, G, 1, N, L)`` or time-invariant ``(1, G, Dg, N, 1)``; outputs ``y (Bt, G, Dg, L)`` and
the last state ``(Bt, G, Dg, N)``.

The sequence is processed in blocks of about ``BLOCK_ELEMENTS`` state entries chained by their last
state (the backward: by the adjoint state, last block first), so that the ten or so passes over a
block's ``(Bt, G, Dg, N, n)`` tensors hit the CPU caches and the scratch memory
(:class:`~nnunet_moe.layers.selective_scan_workspace.ScanWorkspace`) is one block's, whatever ``L``.
Each block is solved in closed form per chunk (:mod:`nnunet_moe.layers.selective_scan_chunks`).

Gradients: a hand-written backward (:class:`ChunkedScan`) instead of autograd through the chunked
forward. It keeps one full-size tensor (the states) and runs the adjoint recurrence with the same
chunked scan on the reversed sequence, then forms the input gradients with a few contractions;
autograd would keep about ten full-size tensors and replay every operation (measured figures: README).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nnunet_moe.layers.selective_scan_chunks import LOG2_E, chunk_layout, chunk_states, unpadded
from nnunet_moe.layers.selective_scan_workspace import ScanWorkspace

__all__ = ["BLOCK_ELEMENTS", "ChunkedScan", "scan_values"]

# State entries (batch x channels x N x positions) per block of the scan. Blocks of 8 MB
# (float32) measured fastest among 2-16 MB on a 2-core Xeon (2.5 MB L2 per core, 48 MB L3): 1.2x
# (D_in 192) to 1.9x (D_in 192, L 32768) faster than one block of the whole sequence; on a 2-core
# AMD EPYC (1 MB L2 per core, 32 MB L3) 4 and 8 MB were equal, 2 and 16 MB slower.
BLOCK_ELEMENTS = 2 ** 21


def _blocks(delta5: torch.Tensor, a5: torch.Tensor, chunk_size: int) -> list[slice]:
    """Blocks of positions of about ``BLOCK_ELEMENTS`` state entries, each a multiple of ``chunk_size``
    positions (so whole chunks of any ``T`` dividing it) except the last."""
    per_position = math.prod(delta5.shape[:-2]) * a5.shape[-2]  # Bt * G * Dg * N
    length = delta5.shape[-1]
    block = max(chunk_size, BLOCK_ELEMENTS // per_position // chunk_size * chunk_size)
    return [slice(s, min(s + block, length)) for s in range(0, length, block)]


def _nonneg(delta5: torch.Tensor) -> bool:
    return bool(delta5.detach().amin() >= 0)


def _positions(m: torch.Tensor, part: slice) -> torch.Tensor:
    """Positions ``part`` of a variable B / C; a time-invariant one (last dim 1) is returned as is."""
    return m if m.shape[-1] == 1 else m[..., part]


def scan_values(delta5, u5, a5, b_mat, c_mat, chunk_size: int, workspace: ScanWorkspace, keep_states: bool,
                delta_is_scratch: bool = False):
    """Forward of the scan: ``y (Bt, G, Dg, L)``, last state and (``keep_states``) all states
    ``h (Bt, G, Dg, N, L)``, else None. ``delta_is_scratch``: ``delta5`` may be overwritten.

    The sequence is processed in blocks of about ``BLOCK_ELEMENTS`` state entries, each with its own
    chunk length and starting from the previous block's last state: the full-size tensors of one block
    stay in the CPU caches between the ten passes over them, and the scratch memory is one block's
    (``workspace``: each block's decays, then its products ``h * C``, in ``decays``; its states in
    ``states`` unless they are formed in the kept states themselves). A block's ``delta`` becomes
    ``delta * u`` in place once its layout is made (``delta_is_scratch``).
    """
    length = delta5.shape[-1]
    nonneg = _nonneg(delta5)
    a2 = a5.unsqueeze(-1) * LOG2_E
    parts = _blocks(delta5, a5, chunk_size)
    y = delta5.new_empty(delta5.shape[:-2] + (length,))                          # (Bt, G, Dg, L)
    states = delta5.new_empty(torch.broadcast_shapes(delta5.shape, a5.shape)[:-1] + (length,)) if keep_states else None
    last = None
    for part in parts:
        n = part.stop - part.start
        chunks = chunk_layout(delta5[..., part], a5, chunk_size, nonneg)
        # the block's delta is not needed after its layout
        du = delta5[..., part].mul_(u5[..., part]) if delta_is_scratch else delta5[..., part] * u5[..., part]
        whole = states is not None and len(parts) == 1 and not chunks.pad  # the states are h itself
        shape = chunks.state_shape(a2)
        decays = workspace.decays(shape)
        h, last = chunk_states(chunks, a2, chunks.chunked(du), chunks.chunked(_positions(b_mat, part)),
                               decays=decays, out=chunks.chunked(states) if whole else workspace.states(shape),
                               h0=last)
        if states is not None and not whole:
            # formed in the (contiguous, cache-resident) scratch buffer, then copied out: formed in place
            # in a slice of the whole states, every pass would stride through them
            states[..., part].copy_(unpadded(h, n))
        c = chunks.chunked(_positions(c_mat, part))
        # the decays are spent: kept states take their product with C there, scratch states in place
        product = torch.mul(h, c, out=decays) if keep_states else h.mul_(c)
        if chunks.pad:
            y[..., part] = unpadded(product.sum(-3), n)
        else:                                                                    # contract the state dim N
            torch.sum(product, -3, out=y[..., part].unflatten(-1, (-1, chunks.T)))
    return y, last, states


class ChunkedScan(torch.autograd.Function):
    """``y_l = <C_l, h_l>`` and ``h_{L-1}`` of the S6 recurrence, with a hand-written backward.

    Autograd through the chunked forward keeps about ten full-size ``(B, D, N, L)`` tensors and replays
    each operation; this backward keeps one (all states ``h``) and runs the adjoint recurrence
    ``g_l = exp(delta_{l+1} A) g_{l+1} + C_l dy_l`` (``g_{L-1}`` also gets the last state's gradient) with
    the same chunked scan on the reversed sequence. Then, with ``q_l = g_l * exp(delta_l A) h_{l-1}
    = g_l * (h_l - delta_l u_l B_l)``::

        dC_l = sum_d dy_l h_l      dB_l = sum_d g_l delta_l u_l      dA = sum_l q_l delta_l
        du_l = delta_l sum_n g_l B_l      ddelta_l = u_l sum_n g_l B_l + sum_n q_l A

    (sums over ``d`` stay within a group; time-invariant ``B`` / ``C`` also sum over batch and ``l``).
    Like the forward, the backward runs in blocks of the reversed sequence (the last positions first,
    each block starting from the adjoint state the later positions left), so a block's passes stay in
    the CPU caches. Layouts as in :func:`scan_values`; ``u5`` like ``delta5``; returns
    ``y (Bt, G, Dg, L)`` and the last state ``(Bt, G, Dg, N)``. The forward uses the caller's
    ``workspace``; the backward, which autograd may run on another thread, looks up its thread's own.
    """

    @staticmethod
    def forward(ctx, delta5, u5, a5, b_mat, c_mat, chunk_size, workspace):
        y, last, h = scan_values(delta5, u5, a5, b_mat, c_mat, chunk_size, workspace, keep_states=True)
        ctx.save_for_backward(delta5, u5, a5, b_mat, c_mat, h)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        delta5, u5, a5, b_mat, c_mat, h = ctx.saved_tensors                    # h: (Bt, G, Dg, N, L)
        workspace = ScanWorkspace.for_thread(delta5.dtype, delta5.device)
        length = delta5.shape[-1]
        if grad_y is None:
            grad_y = delta5.new_zeros(delta5.shape[:-2] + (length,))
        gy5 = grad_y.unsqueeze(-2)                                             # (Bt, G, Dg, 1, L)
        du5 = delta5 * u5
        a_row = a5.transpose(-1, -2)                                           # (1, G, Dg, 1, N)
        # the adjoint recurrence runs on the reversed sequence; there the state at l decays by
        # exp(delta_{l+1} A) on its way to l - 1 (nothing after L - 1)
        delta_rev = F.pad(delta5[..., 1:], (0, 1)).flip(-1)
        nonneg = _nonneg(delta_rev)
        a2 = a5.unsqueeze(-1) * LOG2_E
        gy_rev, c_rev = (t.flip(-1) if t.shape[-1] > 1 else t for t in (gy5, c_mat))
        grad_delta, grad_u = torch.empty_like(delta5), torch.empty_like(u5)
        grad_a, grad_b, grad_c = (torch.zeros_like(t) for t in (a5, b_mat, c_mat))
        g_after = grad_last                                                    # adjoint state after the block
        for rev in _blocks(delta_rev, a5, ctx.chunk_size):
            part = slice(length - rev.stop, length - rev.start)                # the same positions, in order
            chunks = chunk_layout(delta_rev[..., rev], a5, ctx.chunk_size, nonneg)
            shape = chunks.state_shape(a2)
            g_rev, g_after = chunk_states(chunks, a2, chunks.chunked(gy_rev[..., rev]),
                                          chunks.chunked(_positions(c_rev, rev)),
                                          decays=workspace.decays(shape), out=workspace.states(shape), h0=g_after)
            g = unpadded(g_rev, rev.stop - rev.start).flip(-1)                 # (Bt, G, Dg, N, n)
            h_p, du_p, b_p, d_p = h[..., part], du5[..., part], _positions(b_mat, part), delta5[..., part]
            # the decays are spent: the block's products go there instead of fresh memory
            scratch = workspace.decays(g.shape)
            _add_block_grad(grad_c, part, torch.mul(h_p, gy5[..., part], out=scratch))
            _add_block_grad(grad_b, part, torch.mul(g, du_p, out=scratch))
            g_dot_b = torch.mul(g, b_p, out=scratch).sum(-2, keepdim=True)  # (Bt, G, Dg, 1, n)
            q = torch.addcmul(h_p, du_p, b_p, value=-1, out=scratch).mul_(g)  # g_l exp(delta_l A) h_{l-1}
            # contractions over n and l as batched matrix products on q's own layout (einsum would
            # first copy q into a permuted layout)
            grad_a += torch.matmul(q, d_p.transpose(-1, -2)).sum(0, keepdim=True)          # (1, G, Dg, N, 1)
            grad_delta[..., part] = torch.matmul(a_row, q).addcmul_(g_dot_b, u5[..., part])  # (Bt, G, Dg, 1, n)
            grad_u[..., part] = g_dot_b * d_p
        return grad_delta, grad_u, grad_a, grad_b, grad_c, None, None


def _add_block_grad(grad: torch.Tensor, part: slice, block_grad: torch.Tensor) -> None:
    """Add a block's gradient of B or C (``(Bt, G, Dg, N, n)``, summed over the broadcast dims) into
    ``grad``: at the block's positions for a variable B / C, summed over positions for a time-invariant one."""
    target = grad if grad.shape[-1] == 1 else grad[..., part]
    target += block_grad.sum_to_size(target.shape)
