"""Selective scan (the S6 recurrence of Mamba) in pure PyTorch, as a chunked parallel scan.

References
----------
- Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv:2312.00752
  (the S6 recurrence; same call signature and tensor layouts as ``mamba_ssm``'s ``selective_scan_fn``).
- Liu et al., "VMamba: Visual State Space Model", arXiv:2401.10166 and Liu et al., "Swin-UMamba",
  MICCAI 2024 (the users of this operator in this package, through SS2D / SS3D).

Semantics (``selective_scan_fn``)
---------------------------------
Shapes: ``u, delta, z: (B, D_in, L)``; ``A: (D_in, N)``; ``B, C: (B, N, L)``, grouped ``(B, G, N, L)``
(channel ``d`` uses group ``d // (D_in / G)``) or time-invariant ``(D_in, N)``; ``D, delta_bias: (D_in,)``.

    delta   <- softplus(delta + delta_bias)            (bias / softplus optional)
    h_l     =  exp(delta_l * A) * h_{l-1} + delta_l * B_l * u_l        h: (B, D_in, N), h_{-1} = 0
    y_l     =  sum_n C_l[n] * h_l[n]
    out     =  (y + D * u) * silu(z)                                     -> (B, D_in, L), dtype of u
    last    =  h_{L-1}                                                   (if ``return_last_state``)

Algorithm (no Python loop over positions)
-----------------------------------------
The sequence is cut into chunks of ``T`` positions. Inside a chunk, with ``S_p = A * sum_{j<p} delta_j``
(log of the cumulative decay) and a reference position ``r = T // 2``, the recurrence is solved in
closed form::

    h_l = exp(S_{l+1}) h_init + sum_{k<=l} exp(S_{l+1} - S_{k+1}) b_k
        = E_l * (exp(S_r) h_init + cumsum_k(Einv_k * b_k)),   E_l = exp(S_{l+1} - S_r), Einv_k = 1 / E_k

so one ``cumsum`` over the chunk replaces the loop. Measuring the log-decays from the middle of the
chunk bounds every exponent by the larger half's log-decay ``|A| * sum(delta)`` (half the chunk's
total, compared with measuring from an end, so chunks can be twice as long). ``T`` is chosen per block
of positions (halved from ``chunk_size``) so that this bound stays below ``60`` in float32 (``600`` in float64): no
factor inside a chunk overflows or underflows, whatever the magnitudes of ``delta`` and ``A``
(``T = 1`` is always admissible). Only whole-chunk decays ``exp(S_T)`` may underflow to 0, which drops
contributions far below float32 resolution of the carried state.
The chunk-end states then obey a short recurrence ``s_c = exp(S_T^c) s_{c-1} + E_{T-1}^c cumsum_T^c``
over ``L / T`` chunks (a loop over chunks, not positions; on CUDA above 256 chunks a Hillis-Steele
log-step scan with ``log2(L / T)`` vectorised steps). It multiplies decays only, so it is stable too.

Cost: ``O(B * D_in * N * L)`` work and memory (about ten passes over a ``(B, D_in, N, L)`` tensor;
no ``(L x L)`` or ``(T x T)`` tensors). The full-size tensors are written in place into two per-thread
scratch buffers that are kept between calls (up to ``WORKSPACE_CACHE_LIMIT_BYTES`` each;
:func:`clear_workspace`): fresh 50 MB allocations cost more than the arithmetic on CPU. The sequence is
processed in blocks of about ``BLOCK_ELEMENTS`` state entries chained by their last state (the
backward: by the adjoint state, last block first), so that the ten passes of a block hit the CPU
caches and the scratch memory is one block's, whatever ``L``.

Gradients: a hand-written backward (:class:`_ChunkedScan`) instead of autograd through the chunked
forward. It keeps one full-size tensor (the states) and runs the adjoint recurrence with the same
chunked scan on the reversed sequence, then forms the input gradients with a few contractions;
autograd would keep about ten full-size tensors and replay every operation (measured figures: README).

Backends
--------
``backend="auto"`` (default) uses ``mamba_ssm``'s CUDA kernel when it is importable and the tensors are
on CUDA, else this implementation; ``"torch"`` forces this implementation, ``"mamba_ssm"`` forces the
kernel (``ImportError`` naming ``pip install nnunet-moe[cuda]`` when it is not installed). The
environment variable ``NNUNET_MOE_SELECTIVE_SCAN`` (``auto`` / ``torch`` / ``mamba_ssm``) sets the
default when the argument is not given.
"""
from __future__ import annotations

import math
import os
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["selective_scan", "selective_scan_torch", "mamba_ssm_available", "BACKENDS", "BACKEND_ENV_VAR",
           "clear_workspace"]

BACKENDS = ("auto", "torch", "mamba_ssm")
BACKEND_ENV_VAR = "NNUNET_MOE_SELECTIVE_SCAN"

# Largest |exponent| allowed inside a chunk: exp(60) ~ 1e26 leaves float32 (max ~3e38, min normal
# ~1e-38) twelve orders of magnitude of head room for the inputs; float64 allows exp(600).
_LOG_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}
_LOG2_E = 1.0 / math.log(2.0)
# The cross-chunk recurrence is a plain loop over chunks on the CPU at any length: measured 3-12x
# faster than the log-step scan at 128-4096 chunks of 192x16 states (this project's 2-core machine).
# On the devices named here, where each loop step is a kernel launch, more than
# _SEQUENTIAL_CHUNK_LIMIT chunks (tiny chunks forced by huge decays) take the log-step scan instead.
_LOG_STEP_DEVICE_TYPES = ("cuda",)
_SEQUENTIAL_CHUNK_LIMIT = 256


def mamba_ssm_available() -> bool:
    """True when ``mamba_ssm``'s selective-scan CUDA extension can be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception:  # ImportError, or a broken build raising at import (e.g. "no kernel image")
        return False
    return True


def _resolve_backend(backend: str | None, on_cuda: bool) -> str:
    if backend is None:
        backend = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto"
        source = f"environment variable {BACKEND_ENV_VAR}"
    else:
        source = "argument backend"
    if backend not in BACKENDS:
        raise ValueError(f"{source}={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "mamba_ssm" if on_cuda and mamba_ssm_available() else "torch"
    if backend == "mamba_ssm":
        if not mamba_ssm_available():
            raise ImportError(
                f"{source}='mamba_ssm' requests the CUDA selective-scan kernel, but mamba_ssm is not "
                "importable. Install it with `pip install nnunet-moe[cuda]` (needs a CUDA toolchain), "
                f"or use backend='torch' / {BACKEND_ENV_VAR}=torch for the pure-PyTorch scan."
            )
        if not on_cuda:
            raise ValueError(f"{source}='mamba_ssm' needs CUDA tensors; got CPU tensors. Use backend='torch'.")
    return backend


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must have shape (batch, D_in, L), got {tuple(u.shape)}")
    batch, d_in, length = u.shape
    if length < 1:
        raise ValueError(f"sequence length L must be >= 1, got u.shape={tuple(u.shape)}")
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d_in:
        raise ValueError(f"A must have shape (D_in={d_in}, N), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported by the pure-PyTorch selective scan (use a real A)")
    n_state = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        if m.dim() == 2:
            ok = tuple(m.shape) == (d_in, n_state)
            rule = f"(D_in={d_in}, N={n_state})"
        elif m.dim() == 3:
            ok = tuple(m.shape) == (batch, n_state, length)
            rule = f"(batch={batch}, N={n_state}, L={length})"
        elif m.dim() == 4:
            ok = (m.shape[0], m.shape[2], m.shape[3]) == (batch, n_state, length) and m.shape[1] >= 1 \
                and d_in % m.shape[1] == 0
            rule = f"(batch={batch}, G, N={n_state}, L={length}) with D_in={d_in} divisible by G"
        else:
            ok, rule = False, "(D_in, N), (batch, N, L) or (batch, G, N, L)"
        if not ok:
            raise ValueError(f"{name} must have shape {rule}, got {tuple(m.shape)}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and tuple(v.shape) != (d_in,):
            raise ValueError(f"{name} must have shape (D_in={d_in},), got {tuple(v.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have the shape of u {tuple(u.shape)}, got {tuple(z.shape)}")


def _softplus_values(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``max(x, 0) + log(v) + (w - (v - 1))`` with ``w = exp(-|x|)`` and ``v = 1 + w`` rounded.

    ``log1p(w) = log(v) + log(1 + delta / v)`` with ``delta = w - (v - 1)``, which is exact in floating
    point (Sterbenz) and at most half an ulp of 1: adding it restores what rounding ``1 + w`` lost (all
    of ``w`` where ``v`` rounds to 1), to within an ulp of the result. ``out`` may be ``x`` (in place);
    the two temporaries live in the scan's scratch buffers (fresh multi-MB tensors page-fault).
    """
    w, v = (b.view(x.shape) for b in _workspace(x.numel(), x.dtype, x.device))
    torch.abs(x, out=w).neg_().exp_()                        # exp(-|x|) in (0, 1]: no overflow
    out = torch.clamp(x, min=0, out=out)
    out.add_(torch.add(w, 1, out=v).log2_(), alpha=math.log(2.0))  # + log(v)
    return out.add_(w.sub_(torch.add(w, 1, out=v).sub_(1)))  # + (w - (v - 1))


class _Softplus(torch.autograd.Function):
    """:func:`softplus` with its derivative ``sigmoid(x)`` (autograd would replay the formula)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _softplus_values(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def softplus(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``log(1 + exp(x))`` as ``F.softplus`` (within a few ulp), about 3x faster on the CPU.

    torch's CPU ``softplus`` / ``log1p`` kernels are several times slower than ``exp`` and ``log2``
    (measured, torch 2.14: softplus of 192 x 4096 floats 3.7 ms, exp 0.3 ms, log2 0.4 ms); softplus of
    delta was a tenth of the scan's forward time. ``inplace`` writes into ``x`` (without gradients).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        if inplace:
            raise RuntimeError("softplus(inplace=True) is for tensors that need no gradient")
        return _Softplus.apply(x)
    return _softplus_values(x, out=x if inplace else None)


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


class _Chunks(NamedTuple):
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


def _chunk_layout(delta5: torch.Tensor, a5: torch.Tensor, chunk_size: int, nonneg: bool) -> _Chunks:
    """Pick the chunk length ``T`` for ``delta5 (..., 1, L)`` and ``a5 (1, G, Dg, N, 1)``; see :class:`_Chunks`.

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
        a4 = a5.squeeze(-1) * _LOG2_E                                          # (1, G, Dg, N)
        head, tail = ((totals[..., k].movedim(-1, 0).contiguous() * a4).exp2_() for k in (0, 1))
    return _Chunks(chunk, -delta5.shape[-1] % chunk, rel, head, tail, head * tail)


def _chunk_states(chunks: _Chunks, a2, du, b, h0=None, out=None):
    """All states of ``h_l = exp(delta_l A) h_{l-1} + du_l B_l`` (``h_{-1} = h0``, default 0) over ``chunks``.

    Grouped 5-D layout, chunked: ``du: (Bt, G, Dg, 1, nc, T)``, ``a2 = A * log2(e): (1, G, Dg, N, 1, 1)``,
    ``b: (Bt, G, 1, N, nc, T)`` or time-invariant ``(1, G, Dg, N, 1, 1)``, ``h0: (Bt, G, Dg, N)``. Returns
    ``h (Bt, G, Dg, N, nc, T)`` (positions past ``L`` are padding: zero delta and input, so they repeat
    the last state) and the last state ``(Bt, G, Dg, N)``. ``h`` is written into ``out`` when given, else
    into a per-thread scratch buffer (overwritten by the next scan: callers that keep ``h`` pass ``out``).
    """
    rel = chunks.rel
    full_shape = torch.broadcast_shapes(a2.shape, rel.shape)                  # (Bt, G, Dg, N, nc, T)
    buf_e, buf_h = (b_.view(full_shape) for b_ in _workspace(math.prod(full_shape), rel.dtype, rel.device))
    if out is not None:
        buf_h = out
    # Fresh 50 MB tensors per operation cost more than the arithmetic on CPU: everything below writes
    # into the two buffers in place. E_l = exp(S_{l+1} - S_r) as exp2 with A scaled by log2(e) (on the
    # small A): torch's CPU exp2 is ~3x faster than exp (measured, torch 2.14, AVX-512). The rounding of
    # A * log2(e) scales a row's exponents alike, so it cancels in the products E_l / E_k.
    e_fwd = torch.mul(a2, rel, out=buf_e).exp2_()
    # exp(S_r - S_{k+1}) * du_k * B_k: each input scaled to the reference position
    cum = torch.div(du, e_fwd, out=buf_h)
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


def _unpadded(h: torch.Tensor, length: int) -> torch.Tensor:
    """``(..., n_chunks, T) -> (..., L)`` view without the padding."""
    return h.reshape(*h.shape[:-2], -1)[..., :length]


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


def _scan_values(delta5, u5, a5, b_mat, c_mat, chunk_size: int, keep_states: bool, delta_is_scratch: bool = False):
    """Forward of the scan: ``y (Bt, G, Dg, L)``, last state and (``keep_states``) all states
    ``h (Bt, G, Dg, N, L)``, else None. ``delta_is_scratch``: ``delta5`` may be overwritten.

    The sequence is processed in blocks of about ``BLOCK_ELEMENTS`` state entries, each with its own
    chunk length and starting from the previous block's last state: the full-size tensors of one block
    stay in the CPU caches between the ten passes over them, and the scratch memory is one block's.
    A block's ``delta`` becomes ``delta * u`` in place once its layout is made (``delta_is_scratch``).
    """
    length = delta5.shape[-1]
    nonneg = _nonneg(delta5)
    a2 = a5.unsqueeze(-1) * _LOG2_E
    parts = _blocks(delta5, a5, chunk_size)
    y = delta5.new_empty(delta5.shape[:-2] + (length,))                          # (Bt, G, Dg, L)
    states = delta5.new_empty(torch.broadcast_shapes(delta5.shape, a5.shape)[:-1] + (length,)) if keep_states else None
    last = None
    for part in parts:
        n = part.stop - part.start
        chunks = _chunk_layout(delta5[..., part], a5, chunk_size, nonneg)
        # the block's delta is not needed after its layout
        du = delta5[..., part].mul_(u5[..., part]) if delta_is_scratch else delta5[..., part] * u5[..., part]
        whole = states is not None and len(parts) == 1 and not chunks.pad  # the states are h itself
        h, last = _chunk_states(chunks, a2, chunks.chunked(du), chunks.chunked(_positions(b_mat, part)),
                                last, out=chunks.chunked(states) if whole else None)
        if states is not None and not whole:
            # formed in the (contiguous, cache-resident) scratch buffer, then copied out: formed in place
            # in a slice of the whole states, every pass would stride through them
            states[..., part].copy_(_unpadded(h, n))
        c = chunks.chunked(_positions(c_mat, part))
        product = torch.mul(h, c, out=_scratch_like(h)) if keep_states else h.mul_(c)
        if chunks.pad:
            y[..., part] = _unpadded(product.sum(-3), n)
        else:                                                                    # contract the state dim N
            torch.sum(product, -3, out=y[..., part].unflatten(-1, (-1, chunks.T)))
    return y, last, states


class _ChunkedScan(torch.autograd.Function):
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
    the CPU caches. Layouts as in :func:`_scan_values`; ``u5`` like ``delta5``; returns
    ``y (Bt, G, Dg, L)`` and the last state ``(Bt, G, Dg, N)``.
    """

    @staticmethod
    def forward(ctx, delta5, u5, a5, b_mat, c_mat, chunk_size):
        y, last, h = _scan_values(delta5, u5, a5, b_mat, c_mat, chunk_size, keep_states=True)
        ctx.save_for_backward(delta5, u5, a5, b_mat, c_mat, h)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        delta5, u5, a5, b_mat, c_mat, h = ctx.saved_tensors                    # h: (Bt, G, Dg, N, L)
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
        a2 = a5.unsqueeze(-1) * _LOG2_E
        gy_rev, c_rev = (t.flip(-1) if t.shape[-1] > 1 else t for t in (gy5, c_mat))
        grad_delta, grad_u = torch.empty_like(delta5), torch.empty_like(u5)
        grad_a, grad_b, grad_c = (torch.zeros_like(t) for t in (a5, b_mat, c_mat))
        g_after = grad_last                                                    # adjoint state after the block
        for rev in _blocks(delta_rev, a5, ctx.chunk_size):
            part = slice(length - rev.stop, length - rev.start)                # the same positions, in order
            chunks = _chunk_layout(delta_rev[..., rev], a5, ctx.chunk_size, nonneg)
            g_rev, g_after = _chunk_states(chunks, a2, chunks.chunked(gy_rev[..., rev]),
                                           chunks.chunked(_positions(c_rev, rev)), h0=g_after)
            g = _unpadded(g_rev, rev.stop - rev.start).flip(-1)                # (Bt, G, Dg, N, n)
            h_p, du_p, b_p, d_p = h[..., part], du5[..., part], _positions(b_mat, part), delta5[..., part]
            # the reverse scan is done with the scratch buffers: products go there instead of fresh memory
            scratch = _scratch_like(g)
            _add_block_grad(grad_c, part, torch.mul(h_p, gy5[..., part], out=scratch))
            _add_block_grad(grad_b, part, torch.mul(g, du_p, out=scratch))
            g_dot_b = torch.mul(g, b_p, out=scratch).sum(-2, keepdim=True)  # (Bt, G, Dg, 1, n)
            q = torch.addcmul(h_p, du_p, b_p, value=-1, out=scratch).mul_(g)  # g_l exp(delta_l A) h_{l-1}
            # contractions over n and l as batched matrix products on q's own layout (einsum would
            # first copy q into a permuted layout)
            grad_a += torch.matmul(q, d_p.transpose(-1, -2)).sum(0, keepdim=True)          # (1, G, Dg, N, 1)
            grad_delta[..., part] = torch.matmul(a_row, q).addcmul_(g_dot_b, u5[..., part])  # (Bt, G, Dg, 1, n)
            grad_u[..., part] = g_dot_b * d_p
        return grad_delta, grad_u, grad_a, grad_b, grad_c, None


def _add_block_grad(grad: torch.Tensor, part: slice, block_grad: torch.Tensor) -> None:
    """Add a block's gradient of B or C (``(Bt, G, Dg, N, n)``, summed over the broadcast dims) into
    ``grad``: at the block's positions for a variable B / C, summed over positions for a time-invariant one."""
    target = grad if grad.shape[-1] == 1 else grad[..., part]
    target += block_grad.sum_to_size(target.shape)


# State entries (batch x channels x N x positions) per block of the scan. Blocks of 8 MB
# (float32) measured fastest among 2-16 MB on a 2-core Xeon (2.5 MB L2 per core, 48 MB L3): 1.2x
# (D_in 192) to 1.9x (D_in 192, L 32768) faster than one block of the whole sequence; on a 2-core
# AMD EPYC (1 MB L2 per core, 32 MB L3) 4 and 8 MB were equal, 2 and 16 MB slower.
BLOCK_ELEMENTS = 2 ** 21
_WORKSPACE = threading.local()
# Reusing two scratch buffers avoids the page faults of fresh allocations (they tripled the cost of
# each pass over a 50 MB tensor on the CPU we measured). Buffers above this size are not kept.
WORKSPACE_CACHE_LIMIT_BYTES = 256 * 2 ** 20


def _workspace(numel: int, dtype: torch.dtype, device: torch.device):
    """Two flat scratch buffers of ``numel`` elements (cached per thread on CPU, below the size limit)."""
    cached = getattr(_WORKSPACE, "buffers", None)
    if cached is not None and cached[0].numel() >= numel and cached[0].dtype == dtype and cached[0].device == device:
        return cached[0][:numel], cached[1][:numel]
    buffers = (torch.empty(numel, dtype=dtype, device=device), torch.empty(numel, dtype=dtype, device=device))
    keep = device.type == "cpu" and numel * buffers[0].element_size() <= WORKSPACE_CACHE_LIMIT_BYTES
    _WORKSPACE.buffers = buffers if keep else None
    return buffers


def _scratch_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of ``t``'s shape in the first scratch buffer (overwritten by the next use)."""
    return _workspace(t.numel(), t.dtype, t.device)[0].view(t.shape)


def clear_workspace() -> None:
    """Release the cached scratch buffers of the no-grad path."""
    _WORKSPACE.buffers = None


def _grouped(m: torch.Tensor, groups: int, d_group: int, batch: int) -> torch.Tensor:
    """B or C in the 5-D layout: variable ``(B,[G,]N,L)`` -> ``(B, G, 1, N, L)``; invariant ``(D_in, N)`` -> ``(1, G, Dg, N, 1)``."""
    if m.dim() == 2:
        return m.reshape(1, groups, d_group, m.shape[1], 1)
    if m.dim() == 3:
        m = m.unsqueeze(1)
    if m.shape[1] != groups:  # B and C may use different group counts: repeat to the common one
        m = m.repeat_interleave(groups // m.shape[1], dim=1)
    return m.unsqueeze(2)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, chunk_size: int = 64):
    """Pure-PyTorch selective scan (see the module docstring); same arguments as :func:`selective_scan`."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out_dtype = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, d_in, length = u.shape
    n_state = A.shape[1]
    # without gradients, tensors this function made itself (delta after bias / softplus, y) are
    # updated in place: fresh multi-MB temporaries page-fault on the CPU
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (u, delta, A, B, C, D, z, delta_bias))
    u_c = u.to(compute)
    delta_c = delta.to(compute)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta_c = softplus(delta_c, inplace=not track and delta_c is not delta)
    g_b = B.shape[1] if B.dim() == 4 else 1
    g_c = C.shape[1] if C.dim() == 4 else 1
    groups = g_b * g_c // math.gcd(g_b, g_c)
    d_group = d_in // groups

    delta5 = delta_c.reshape(batch, groups, d_group, 1, length)
    u5 = u_c.reshape(batch, groups, d_group, 1, length)
    a5 = A.to(compute).reshape(1, groups, d_group, n_state, 1)
    b_mat = _grouped(B.to(compute), groups, d_group, batch)
    c_mat = _grouped(C.to(compute), groups, d_group, batch)

    if track and any(t.requires_grad for t in (delta5, u5, a5, b_mat, c_mat)):
        y, last = _ChunkedScan.apply(delta5, u5, a5, b_mat, c_mat, chunk_size)
    else:
        y, last, _ = _scan_values(delta5, u5, a5, b_mat, c_mat, chunk_size, keep_states=False,
                                  delta_is_scratch=not track and delta_c is not delta)
    y = y.reshape(batch, d_in, length)  # a view of the scan's own output
    if track:
        out = y if D is None else y + u_c * D.to(compute)[:, None]
        if z is not None:
            out = out * F.silu(z.to(compute))
    else:
        out = y if D is None else y.addcmul_(u_c, D.to(compute)[:, None])
        if z is not None:
            z_c = z.to(compute)
            out.mul_(torch.sigmoid(z_c, out=_scratch_like(z_c)).mul_(z_c))  # silu(z)
    out = out.to(out_dtype)
    if return_last_state:
        return out, last.reshape(batch, d_in, n_state)
    return out


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, backend: str | None = None, chunk_size: int = 64):
    """Selective scan with the semantics of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``.

    Args:
        u, delta: ``(B, D_in, L)``. A: ``(D_in, N)`` (real). B, C: ``(B, N, L)``, ``(B, G, N, L)`` or
            ``(D_in, N)``. D, delta_bias: ``(D_in,)`` or None. z: ``(B, D_in, L)`` or None (gate ``silu(z)``).
        delta_softplus: apply ``softplus`` to ``delta + delta_bias``.
        return_last_state: also return the final state ``(B, D_in, N)``.
        backend: ``"auto"``, ``"torch"`` or ``"mamba_ssm"``; None reads ``NNUNET_MOE_SELECTIVE_SCAN``
            (default ``auto``: the CUDA kernel for CUDA tensors when installed, else pure PyTorch).
        chunk_size: largest chunk length of the pure-PyTorch scan (it may be halved for stability).

    Returns:
        ``out (B, D_in, L)`` in ``u``'s dtype, or ``(out, last_state)``.
    """
    chosen = _resolve_backend(backend, u.is_cuda)
    if chosen == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        _check_shapes(u, delta, A, B, C, D, z, delta_bias)
        return selective_scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                 delta_softplus=delta_softplus, return_last_state=return_last_state)
    return selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                delta_softplus=delta_softplus, return_last_state=return_last_state,
                                chunk_size=chunk_size)
