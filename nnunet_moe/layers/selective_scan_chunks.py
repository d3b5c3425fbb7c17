"""One block of the selective scan solved in closed form per chunk (the S6 recurrence of Gu & Dao,
"Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv:2312.00752).

Layout: the grouped 5-D layout of :mod:`nnunet_moe.layers.selective_scan_kernels`, ``delta, u: (Bt, G, Dg,
1, n)``, ``A: (1, G, Dg, N, 1)``, ``B: (Bt, G, 1, N, n)`` or time-invariant ``(1, G, Dg, N, 1)``, for the
``n`` positions of one block, cut into ``nc`` chunks of ``T`` positions: ``(..., nc, T)``.

The recurrence ``h_l = exp(delta_l A) h_{l-1} + delta_l B_l u_l`` is solved without a loop over
positions. Inside a chunk, with ``S_p = A * sum_{j<p} delta_j`` (log of the cumulative decay) and a
reference position ``r = T // 2``::

    h_l = exp(S_{l+1}) h_init + sum_{k<=l} exp(S_{l+1} - S_{k+1}) b_k
        = E_l * (exp(S_r) h_init + cumsum_k(Einv_k * b_k)),   E_l = exp(S_{l+1} - S_r), Einv_k = 1 / E_k

so one ``cumsum`` over the chunk replaces the loop. Measuring the log-decays from the middle of the
chunk bounds every exponent by the larger half's log-decay ``|A| * sum(delta)`` (half the chunk's
total, compared with measuring from an end, so chunks can be twice as long). ``T`` is halved from
``chunk_size`` (per block) until this bound stays below ``60`` in float32 (``600`` in float64): no
factor inside a chunk overflows or underflows, whatever the magnitudes of ``delta`` and ``A``
(``T = 1`` is always admissible). Only whole-chunk decays ``exp(S_T)`` may underflow to 0, which drops
contributions far below float32 resolution of the carried state.
The chunk-end states then obey a short recurrence ``s_c = exp(S_T^c) s_{c-1} + E_{T-1}^c cumsum_T^c``
over the ``nc`` chunks (a loop over chunks, not positions; on CUDA above 256 chunks a Hillis-Steele
log-step scan with ``log2(nc)`` vectorised steps). It multiplies decays only, so it is stable too.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Chunks", "chunk_layout", "chunk_states", "unpadded", "LOG2_E"]

# Largest |exponent| allowed inside a chunk: exp(60) ~ 1e26 leaves float32 (max ~3e38, min normal
# ~1e-38) twelve orders of magnitude of head room for the inputs; float64 allows exp(600).
_LOG_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}
LOG2_E = 1.0 / math.log(2.0)
# The cross-chunk recurrence is a plain loop over chunks on the CPU at any length: measured 3-12x
# faster than the log-step scan at 128-4096 chunks of 192x16 states (this project's 2-core machine).
# On the devices named here, where each loop step is a kernel launch, more than
# _SEQUENTIAL_CHUNK_LIMIT chunks (tiny chunks forced by huge decays) take the log-step scan instead.
_LOG_STEP_DEVICE_TYPES = ("cuda",)
_SEQUENTIAL_CHUNK_LIMIT = 256


def _chunk_recurrence(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Inclusive scan of ``s_c = decay_c * s_{c-1} + inputs_c`` along dim 0 (``s_{-1} = 0``), chunk-major.

    Chunk-major (the chunk index first, each chunk's states contiguous) so that every step of the
    plain recurrence is one fused op on contiguous memory; the caller builds its tensors in that
    layout directly (transposing copies of the summaries cost more than the recurrence). The plain
    recurrence over the ``L / T`` chunk summaries is used on the CPU (a few small vectorised
    operations per chunk beat a log-step scan's passes over all of them) and for short sequences
    elsewhere; long sequences on ``_LOG_STEP_DEVICE_TYPES`` (only when pathological decays force tiny
    chunks) use a Hillis-Steele log-step scan: ``ceil(log2(n))`` vectorised steps. Both only multiply
    decays, so nothing overflows that the recurrence itself would not.
    """
    n = inputs.shape[0]
    if n <= _SEQUENTIAL_CHUNK_LIMIT or inputs.device.type not in _LOG_STEP_DEVICE_TYPES:
        out = torch.empty_like(inputs)
        outs, ins, decays = out.unbind(0), inputs.unbind(0), decay.unbind(0)  # views, made in one call
        outs[0].copy_(ins[0])
        for c in range(1, n):
            torch.addcmul(ins[c], decays[c], outs[c - 1], out=outs[c])
        return out
    offset = 1
    while offset < n:
        inputs = torch.cat([inputs[:offset], inputs[offset:] + decay[offset:] * inputs[:-offset]], 0)
        decay = torch.cat([decay[:offset], decay[offset:] * decay[:-offset]], 0)
        offset *= 2
    return inputs


def _reference_index(chunk: int) -> int:
    """Position ``r`` inside a chunk whose cumulative decay ``S_r`` the exponents are measured from."""
    return max(1, chunk // 2)


class Chunks(NamedTuple):
    """A block of positions cut into ``n_chunks`` chunks of ``T`` positions (zero-padded at the end).

    ``rel (Bt, G, Dg, 1, nc, T)``: ``P_{l+1} - P_r`` per position (``P_p = sum_{j<p} delta_j`` within the
    chunk); chunk-major ``(nc, Bt, G, Dg, N)`` decays of each chunk: ``head = exp(S_r)`` (carried-in state
    to the reference position), ``tail = exp(S_T - S_r)`` and ``whole = exp(S_T)``.
    """

    T: int
    pad: int
    rel: torch.Tensor
    head: torch.Tensor
    tail: torch.Tensor
    whole: torch.Tensor

    def chunked(self, t: torch.Tensor) -> torch.Tensor:
        return _chunked(t, self.T)

    def state_shape(self, a2: torch.Tensor) -> torch.Size:
        """``(Bt, G, Dg, N, nc, T)``: the shape of the block's states and decays, for ``a2 (1, G, Dg, N, 1, 1)``."""
        return torch.broadcast_shapes(a2.shape, self.rel.shape)


def _chunked(t: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(..., L) -> (..., n_chunks, chunk)`` (zero-padded); time-invariant ``(..., 1)`` broadcasts."""
    if t.shape[-1] == 1:
        return t.unsqueeze(-1)
    pad = -t.shape[-1] % chunk
    t = F.pad(t, (0, pad)) if pad else t
    return t.reshape(*t.shape[:-1], -1, chunk)


def _half_sums(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per chunk of ``x (..., 1, L)`` (zero-padded): sums before and from ``r`` -> ``(..., 1, nc, 2)``."""
    d = _chunked(x, chunk)
    ref = _reference_index(chunk)
    if chunk == 2 * ref:
        return d.reshape(*d.shape[:-1], 2, ref).sum(-1)
    return torch.stack([d[..., :ref].sum(-1), d[..., ref:].sum(-1)], -1)


def chunk_layout(delta5: torch.Tensor, a5: torch.Tensor, chunk_size: int, nonneg: bool) -> Chunks:
    """Pick the chunk length ``T`` for ``delta5 (..., 1, L)`` and ``a5 (1, G, Dg, N, 1)``; see :class:`Chunks`.

    With ``r = _reference_index(T)``, ``T`` is halved until ``max |A| * max(P_r, P_T - P_r) <= limit``
    over all chunks (sums of ``|delta|``), which bounds every exponent used inside a chunk (``T = 1``
    always qualifies: its only exponent is 0). Chosen per block of positions, so that a few large
    decays shorten only their block's chunks. ``rel`` is formed as a prefix sum from ``r`` or a suffix
    sum up to ``r``: no cancellation error. ``nonneg``: ``delta >= 0`` (after softplus), ``|delta| = delta``.
    """
    limit = _LOG_LIMIT.get(delta5.dtype, 60.0)
    chunk = max(1, min(chunk_size, delta5.shape[-1]))
    with torch.no_grad():
        delta5 = delta5.detach()
        abs_a_max = a5.detach().abs().amax(dim=-2, keepdim=True).unsqueeze(-1)  # (1, G, Dg, 1, 1, 1)
        sizes = delta5 if nonneg else delta5.abs()
        while True:
            halves = _half_sums(sizes, chunk)
            if chunk == 1 or float((abs_a_max * halves).amax()) <= limit:
                break
            chunk //= 2
        totals = halves if nonneg else _half_sums(delta5, chunk)  # P_r and P_T - P_r per chunk
        d = _chunked(delta5, chunk)  # zero delta: the padded steps neither decay nor add
        ref = _reference_index(chunk)
        rel = torch.empty_like(d)
        if ref > 1:  # -sum_{j=l+1}^{r-1} delta_j: a cumsum of the reversed positions (flip copies)
            torch.neg(d[..., 1:ref].flip(-1).cumsum_(-1).flip(-1), out=rel[..., :ref - 1])
        rel[..., ref - 1] = 0
        torch.cumsum(d[..., ref:], -1, out=rel[..., ref:])                    # sum_{j=r}^{l} delta_j
        # chunk-major and contiguous (an elementwise op on a moved view would keep the view's strides)
        a4 = a5.squeeze(-1) * LOG2_E                                          # (1, G, Dg, N)
        head, tail = ((totals[..., k].movedim(-1, 0).contiguous() * a4).exp2_() for k in (0, 1))
    return Chunks(chunk, -delta5.shape[-1] % chunk, rel, head, tail, head * tail)


def chunk_states(chunks: Chunks, a2, du, b, decays: torch.Tensor, out: torch.Tensor, h0=None):
    """All states of ``h_l = exp(delta_l A) h_{l-1} + du_l B_l`` (``h_{-1} = h0``, default 0) over ``chunks``.

    Grouped 5-D layout, chunked: ``du: (Bt, G, Dg, 1, nc, T)``, ``a2 = A * log2(e): (1, G, Dg, N, 1, 1)``,
    ``b: (Bt, G, 1, N, nc, T)`` or time-invariant ``(1, G, Dg, N, 1, 1)``, ``h0: (Bt, G, Dg, N)``. Writes
    the per-position decays ``E_l`` into ``decays`` and the states into ``out`` (both of shape
    ``chunks.state_shape(a2) = (Bt, G, Dg, N, nc, T)``); returns ``h`` (that is, ``out``; positions past
    ``L`` are padding: zero delta and input, so they repeat the last state) and the last state
    ``(Bt, G, Dg, N)``. After the call ``decays`` is spent: the caller may overwrite it.
    """
    rel = chunks.rel
    # Fresh 50 MB tensors per operation cost more than the arithmetic on CPU: everything below writes
    # into the two buffers in place. E_l = exp(S_{l+1} - S_r) as exp2 with A scaled by log2(e) (on the
    # small A): torch's CPU exp2 is ~3x faster than exp (measured, torch 2.14, AVX-512). The rounding of
    # A * log2(e) scales a row's exponents alike, so it cancels in the products E_l / E_k.
    e_fwd = torch.mul(a2, rel, out=decays).exp2_()
    # exp(S_r - S_{k+1}) * du_k * B_k: each input scaled to the reference position
    cum = torch.div(du, e_fwd, out=out)
    cum.mul_(b).cumsum_(-1)
    # chunk summaries chunk-major (nc, Bt, G, Dg, N): the chunk's own input E_{T-1} * cum_{T-1}, with
    # E_{T-1} = exp(S_T - S_r) (cum's last entries are gathered in their own order, then transposed: a
    # gather straight into chunk-major order reads one element per memory page)
    chunk_inputs = torch.mul(cum[..., -1].contiguous().movedim(-1, 0), chunks.tail,
                             out=torch.empty_like(chunks.tail))  # contiguous: each recurrence step reads a block
    if h0 is not None:  # the initial state enters the first chunk's summary as carried-in input
        chunk_inputs[0] += chunks.whole[0] * h0
    chunk_end_states = _chunk_recurrence(chunks.whole, chunk_inputs)      # state after each chunk
    carried = torch.empty_like(chunk_end_states)                          # exp(S_r) * state before each chunk
    if h0 is None:
        carried[0] = 0
    else:
        torch.mul(chunks.head[0], h0, out=carried[0])
    torch.mul(chunks.head[1:], chunk_end_states[:-1], out=carried[1:])
    h = cum.add_(carried.movedim(0, -1).unsqueeze(-1)).mul_(e_fwd)        # E_l * (exp(S_r) h_init + cum_l)
    # padded steps neither decay nor add, so the state after the last chunk is the state at L - 1
    return h, chunk_end_states[-1]


def unpadded(h: torch.Tensor, length: int) -> torch.Tensor:
    """``(..., n_chunks, T) -> (..., L)`` view without the padding."""
    return h.reshape(*h.shape[:-2], -1)[..., :length]
