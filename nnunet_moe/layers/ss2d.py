"""SS2D / SS3D: the multi-directional selective-scan mixer of the VSS block, for 2D and 3D images.

References
----------
- Liu et al., "VMamba: Visual State Space Model", arXiv:2401.10166 (SS2D, cross-scan / cross-merge).
- Liu et al., "Swin-UMamba: Mamba-based UNet with ImageNet-based pretraining", MICCAI 2024, Sec. 2.1
  (SS2D with four scan directions inside the VSS blocks of encoder and decoder).
- Gu & Dao, "Mamba", arXiv:2312.00752 (S6 parameterisation: dt / A / D initialisation).

Shapes
------
Input and output are channels-last: ``(B, H, W, C)`` for :class:`SS2D`, ``(B, D, H, W, C)`` for
:class:`SS3D`. Inside, with ``d_inner = expand * C`` channels and ``L = H*W`` (``D*H*W``) positions::

    in_proj: C -> 2 d_inner (x, z) ; depthwise conv (kernel 3) + SiLU on x
    cross-scan: K sequences (B, K, d_inner, L) ; per direction x_proj -> (dt_rank, N, N) ; dt_proj -> d_inner
    selective_scan(delta_softplus, delta_bias = dt_projs_bias) -> K outputs ; cross-merge (sum) -> (B, L, d_inner)
    out_norm (LayerNorm) ; * SiLU(z) ; out_proj: d_inner -> C

Parameters follow the VMamba-Tiny checkpoint layout so its weights load by name: ``in_proj``,
``conv2d`` (``conv3d`` in 3D), ``x_proj_weight (K, dt_rank + 2N, d_inner)``, ``dt_projs_weight
(K, d_inner, dt_rank)``, ``dt_projs_bias (K, d_inner)``, ``A_logs (K*d_inner, N)``, ``Ds (K*d_inner,)``,
``out_norm``, ``out_proj``. Defaults are the paper's: ``d_state=16``, conv kernel 3, ``expand=2``,
``dt_rank = ceil(C / 16)``.

Scan directions
---------------
2D (K = 4, VMamba's order, which the checkpoint's per-direction weights depend on): row-major,
column-major, row-major reversed, column-major reversed.

3D (K = 6): the three raster orders in which each axis in turn is the fastest-varying one
(``(D,H,W)``, ``(H,W,D)``, ``(W,D,H)``: cyclic rotations), each forward and reversed. Why six: a causal
scan only sees what precedes a voxel, and only the fastest axis keeps neighbours adjacent in the
sequence. With every axis fastest once and both orientations of each sequence, every voxel's context
covers each axis in both directions (and, through the slower axes, the whole volume), exactly as the
four 2D directions do for rows and columns. The cost is linear in K, so six scans cost 1.5x the four
of 2D per position; all 48 axis-permutation/flip combinations would cost 8x more for little new context.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_moe.layers.selective_scan import selective_scan

__all__ = ["SS2D", "SS3D", "SelectiveScanND", "scan_orders"]


def scan_orders(spatial_dims: int) -> list[tuple[int, ...]]:
    """Axis orders (slowest to fastest) of the forward scans: the cyclic rotations of the spatial axes."""
    axes = tuple(range(spatial_dims))
    return [axes[i:] + axes[:i] for i in range(spatial_dims)]


class SelectiveScanND(nn.Module):
    """Shared implementation of :class:`SS2D` and :class:`SS3D` (``2 * spatial_dims`` scan directions)."""

    def __init__(self, d_model: int, spatial_dims: int, d_state: int = 16, d_conv: int = 3, expand: float = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 dt_scale: float = 1.0, conv_bias: bool = True, bias: bool = False, dropout: float = 0.0,
                 scan_backend: str | None = None, chunk_size: int = 64) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if d_model < 1 or d_state < 1 or d_conv < 1 or d_conv % 2 == 0:
            raise ValueError(f"need d_model >= 1, d_state >= 1 and an odd d_conv; got {d_model}, {d_state}, {d_conv}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.spatial_dims = spatial_dims
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.orders = scan_orders(spatial_dims)
        self.num_directions = 2 * len(self.orders)
        self.scan_backend = scan_backend
        self.chunk_size = chunk_size
        k, d_inner, rank = self.num_directions, self.d_inner, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        conv_cls = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        # named conv2d / conv3d so the 2D parameters carry VMamba's checkpoint names
        setattr(self, f"conv{spatial_dims}d", conv_cls(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2,
                                                       groups=d_inner, bias=conv_bias))
        # per-direction projections, stacked: x -> (dt_rank, B, C) and dt_rank -> d_inner
        bound = d_inner ** -0.5  # nn.Linear's default init for a (d_inner -> ...) layer
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        dt_std = rank ** -0.5 * dt_scale
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, rank).uniform_(-dt_std, dt_std))
        # Mamba's dt init: dt log-uniform in [dt_min, dt_max]; bias = softplus^{-1}(dt)
        dt = torch.exp(torch.rand(k, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real init: A = -(1..N) per channel, stored as log; skip connection D = 1
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(k * d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(a))
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        self.A_logs._no_weight_decay = True  # as in Mamba / VMamba: no weight decay on A and D
        self.Ds._no_weight_decay = True
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def conv(self) -> nn.Module:
        return getattr(self, f"conv{self.spatial_dims}d")

    def _cross_scan(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, d, *S)`` -> ``(B, K, d, L)``: forward scans in each order, then the same reversed."""
        batch, channels = x.shape[:2]
        seqs = [x.permute(0, 1, *(2 + a for a in order)).reshape(batch, channels, -1) for order in self.orders]
        forward = torch.stack(seqs, 1)
        return torch.cat([forward, forward.flip(-1)], 1)

    def _cross_merge(self, y: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
        """``(B, K, d, L)`` -> ``(B, d, *S)``: undo each scan order and sum the K directions."""
        half = len(self.orders)
        y = y[:, :half] + y[:, half:].flip(-1)
        batch, _, channels, _ = y.shape
        merged = 0
        for i, order in enumerate(self.orders):
            grid = y[:, i].reshape(batch, channels, *(spatial[a] for a in order))
            merged = merged + grid.permute(0, 1, *(2 + order.index(a) for a in range(self.spatial_dims)))
        return merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__} expects channels-last input (B, *spatial[{self.spatial_dims}], "
                             f"C={self.d_model}), got {tuple(x.shape)}")
        spatial = tuple(x.shape[1:-1])
        batch, length = x.shape[0], math.prod(spatial)
        k, d_inner, n = self.num_directions, self.d_inner, self.d_state

        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv(x.movedim(-1, 1)))                      # (B, d_inner, *S)
        xs = self._cross_scan(x)                                      # (B, K, d_inner, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, b_ssm, c_ssm = torch.split(x_dbl, [self.dt_rank, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        y = selective_scan(
            xs.reshape(batch, k * d_inner, length), dts.reshape(batch, k * d_inner, length),
            -torch.exp(self.A_logs.float()), b_ssm, c_ssm, self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(), delta_softplus=True,
            backend=self.scan_backend, chunk_size=self.chunk_size,
        ).reshape(batch, k, d_inner, length)
        y = self._cross_merge(y, spatial).movedim(1, -1)              # (B, *S, d_inner)
        y = self.out_norm(y) * F.silu(z)
        return self.dropout(self.out_proj(y))


class SS2D(SelectiveScanND):
    """2D selective scan with four directions (VMamba / Swin-UMamba). Input/output ``(B, H, W, C)``."""

    def __init__(self, d_model: int, **kwargs) -> None:
        super().__init__(d_model, spatial_dims=2, **kwargs)


class SS3D(SelectiveScanND):
    """3D extension with six directions (see the module docstring). Input/output ``(B, D, H, W, C)``."""

    def __init__(self, d_model: int, **kwargs) -> None:
        super().__init__(d_model, spatial_dims=3, **kwargs)
