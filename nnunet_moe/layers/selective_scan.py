"""Selective scan (the S6 recurrence of Mamba): public entry point, backend choice and shape checks.

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

Pure-PyTorch implementation
---------------------------
:func:`selective_scan_torch` brings the inputs into a grouped 5-D layout and runs the chunked scan
of :mod:`nnunet_moe.layers.selective_scan_kernels` (blocks of positions, hand-written backward), each
block solved in closed form per chunk by :mod:`nnunet_moe.layers.selective_scan_chunks`; no Python
loop over positions, ``O(B * D_in * N * L)`` work and memory (about ten passes over a
``(B, D_in, N, L)`` tensor; no ``(L x L)`` or ``(T x T)`` tensors), exact and finite whatever the
magnitudes of ``delta`` and ``A``. Its full-size intermediates live in a per-thread
:class:`~nnunet_moe.layers.selective_scan_workspace.ScanWorkspace` that is kept between calls
(:func:`clear_workspace` releases it): fresh multi-MB allocations cost more than the arithmetic on CPU.

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

import torch
import torch.nn.functional as F

from nnunet_moe.layers.selective_scan_kernels import ChunkedScan, scan_values
from nnunet_moe.layers.selective_scan_workspace import ScanWorkspace, clear_workspace
from nnunet_moe.layers.softplus import softplus

__all__ = ["selective_scan", "selective_scan_torch", "mamba_ssm_available", "BACKENDS", "BACKEND_ENV_VAR",
           "clear_workspace"]

BACKENDS = ("auto", "torch", "mamba_ssm")
BACKEND_ENV_VAR = "NNUNET_MOE_SELECTIVE_SCAN"


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
    workspace = ScanWorkspace.for_thread(compute, u.device)
    u_c = u.to(compute)
    delta_c = delta.to(compute)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(compute)[:, None]
    if delta_softplus:
        # before the scan both scratch buffers are free for the softplus temporaries
        delta_c = softplus(delta_c, inplace=not track and delta_c is not delta,
                           scratch=(workspace.decays(delta_c.shape), workspace.states(delta_c.shape)))
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
        y, last = ChunkedScan.apply(delta5, u5, a5, b_mat, c_mat, chunk_size, workspace)
    else:
        y, last, _ = scan_values(delta5, u5, a5, b_mat, c_mat, chunk_size, workspace, keep_states=False,
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
            # after the scan its decays are spent: the gate goes there
            out.mul_(torch.sigmoid(z_c, out=workspace.decays(z_c.shape)).mul_(z_c))  # silu(z)
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
