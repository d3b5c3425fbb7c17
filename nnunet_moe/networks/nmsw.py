"""NMSW-Net ("No More Sliding Window"): learned top-K patch selection instead of sliding-window inference.

Reference
---------
Jeon, Yang, Fu, Feng, "No More Sliding Window: Efficient 3D Medical Image Segmentation with
Differentiable Top-k Patch Sampling" (NMSW-Net). A global network segments the whole volume at low
resolution; an objectness head scores every candidate patch; K patches are picked with a
differentiable Gumbel top-K; a local network segments only those patches at full resolution; an
aggregation block fuses the upsampled global logits with the Gaussian-weighted patch logits.

API (for the trainer / predictor integration)
---------------------------------------------
``NMSWNet(global_net, local_net, num_classes, in_channels, patch_size, global_input_size, k_train=3,
k_random=1, k_infer=5, tau=2/3, overlap=0.5, blend="learned", objectness_from="auto",
detach_global_in_aggregation=False, ...)``

- ``global_net`` / ``local_net``: any ``nn.Module`` mapping ``(N, in_channels, *shape)`` to
  ``(N, num_classes, *shape)`` logits. If a net returns a list/tuple (deep supervision), element 0
  (the full-resolution output, nnU-Net's convention) is used; build them with deep supervision
  off to save compute. ``global_net`` must accept ``global_input_size``; ``local_net`` the patch.
- ``model(x_high, x_low=None, k=None, k_random=None) -> NMSWOutput`` (training and validation):
  ``x_high (B, C_in, *S)`` full-resolution volumes (any ``S``; axes smaller than the patch are
  zero-padded like nnU-Net's ``pad_nd_image`` and the padding is removed from every full-size
  output), ``x_low (B, C_in, *global_input_size)`` the downsampled whole volume (computed from
  ``x_high`` by (bi/tri)linear resizing when omitted). In ``train()`` mode: Gumbel top-``k_train``
  + ``k_random`` uniform cells; in ``eval()``: deterministic top-``k_infer`` (fixed K for the batch,
  clamped to the grid), no noise unless ``noise_at_eval=True``.
- ``model.predict(volume) -> logits``: inference without any sliding window. ``volume`` is
  ``(C_in, *S)`` (nnU-Net's ``predict_sliding_window_return_logits`` input; output ``(C, *S)``) or
  ``(B, C_in, *S)``. Deterministic top-K per volume with ``K = min(k_infer, G, number of cells
  whose global prediction contains foreground)`` when ``infer_only_foreground`` and
  ``mask_background`` are True (the defaults: a cell the global net calls pure background is not
  worth a local pass; otherwise ``K = min(k_infer, G)``, silently clamped); a volume with no
  foreground cell gets the upsampled global logits. Every voxel is written; a non-finite global or
  local network output raises ``RuntimeError``. Restores train/eval mode.
- ``NMSWOutput`` fields (full-size = unpadded ``S``; "padded" = after ``pad_to_patch_size``):
  ``logits (B, C, *S)`` aggregated; ``global_logits (B, C, *S)`` upsampled global;
  ``global_logits_low (B, C, *global_input_size)``; ``local_logits (B, K, C, *patch)``;
  ``patch_slices`` B lists of K tuples of spatial slices in *padded* coordinates;
  ``cell_indices (B, K)``; ``is_random (K,)``; ``selection (B, K, G)`` straight-through one-hots;
  ``objectness (B, G)`` masked objectness logits; ``selection_probs (B, G) = softmax(objectness)``;
  ``foreground_cells (B, G)`` bool; ``grid`` (:class:`PatchGrid` of the padded volume);
  ``pad_slicer`` spatial slices removing the padding.
- Targets for the three losses: ``model.crop_patches(seg, out.cell_indices)`` -> ``(B, K, C', *patch)``
  (same padding and grid), ``model.resize_to_global(seg, is_label=True)`` -> nearest-neighbour
  ``(B, C', *global_input_size)``; ``out.logits`` / ``out.global_logits`` match the full-size ``seg``.
- ``selection_entropy(out.objectness)``: mean entropy (nats) of the selection distribution; the
  paper's loss is ``Dice+CE(high) + Dice+CE(low) + mean_k Dice+CE(patch_k) - lambda * H`` with
  ``lambda = 1e-4`` (``ENTROPY_WEIGHT``; subtracting rewards exploration).
- Built from nnU-Net plans: :mod:`nnunet_moe.networks.nmsw_plans`.

Objectness (``objectness_from``, attribute ``objectness_source`` says which one runs):

- ``"features"`` (paper and authors' code): the global network's penultimate features, i.e. the input of
  its last 1x1 output conv, ``(B, F, *global_input_size)``, go through :class:`FeatureObjectnessHead`
  (Conv(3) F->hidden - LeakyReLU - Conv(1) hidden->1) to a dense score map ``(B, 1, *global_input_size)``;
  its gradient trains the global network's encoder and decoder. Reachable by construction for the U-Nets
  of dynamic-network-architectures that nnU-Net's ``get_network_from_plans`` builds (PlainConvUNet,
  ResidualEncoderUNet, ...; see :func:`penultimate_feature_layer` for the rule): a forward pre-hook,
  registered once on that layer in ``__init__``, records its input during the global pass of this
  network's own forward only (not when the layer runs elsewhere) and the reference is dropped before the
  global stage returns, so no tensor outlives the forward. Works with and without gradients.
- ``"logits"`` (fallback for any other global network): :class:`ObjectnessHead` on the softmax of the global
  logits concatenated with ``x_low``; gradients reach the global net through the softmax.
- ``"auto"`` (default): ``"features"`` where the rule finds the layer, else ``"logits"``. Asking for
  ``"features"`` on a network without it is a ``ValueError``. The two heads have different weights, so
  checkpoints of one do not load into the other (the state-dict keys stay under ``objectness_head.``).

Either dense score map is averaged over each cell's exact footprint on the global grid (summed-area
table, :func:`box_sums`) -- overlapping patches get overlapping footprints, which adaptive pooling to the
grid shape would not reproduce (the authors resize the features to the patch grid first; averaging
after the head is the same up to the head's non-linearity). Cells whose footprint contains no
foreground in ``argmax(global_logits_low)`` get ``-background_penalty`` (1e4, not ``-inf``, so the
softmax and entropy stay finite). This assumes softmax outputs with background at channel 0; use
``mask_background=False`` for region-based (sigmoid) label sets.

Global logits in the aggregation: ``detach_global_in_aggregation=True`` blends ``global_logits.detach()``
with the patches (the authors' code), so the aggregated output's loss no longer reaches the global
network through the blend (the low-resolution loss and the objectness path still train it); default
False (the paper's blend, gradients to both).

Straight-through crops: each crop is multiplied by its selection weight (``straight_through="standard"``:
exactly 1.0 forward, soft-selection gradient backward; ``"scaled"``: the paper's ``hard * soft``, the
soft probability forward), so the loss reaches the objectness scores. Only the chosen cell's
entry of the relaxed one-hot gets the crop gradient (the paper's inner product ``<z, X_patch>`` over
all N candidate patches would need every patch cropped); the softmax spreads it to all cells.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_moe.layers.gumbel_topk import GumbelTopK, TopKSelection, gumbel_topk
from nnunet_moe.layers.patch_aggregation import PatchAggregation
from nnunet_moe.layers.patch_grid import PatchGrid, box_sums, pad_to_patch_size

__all__ = ["NMSWNet", "NMSWOutput", "ObjectnessHead", "FeatureObjectnessHead", "penultimate_feature_layer",
           "OBJECTNESS_SOURCES", "selection_entropy", "ENTROPY_WEIGHT", "first_output"]

ENTROPY_WEIGHT = 1e-4  # paper (the authors' code uses 1e-5)
OBJECTNESS_SOURCES = ("auto", "features", "logits")
FEATURES_RULE = ("global_net.decoder.seg_layers must be a non-empty nn.ModuleList whose last entry is a Conv2d/Conv3d "
                 "(the output conv of dynamic-network-architectures' U-Nets, whose input are the decoder's last "
                 "features)")

SpatialSlices = Tuple[slice, ...]


class NMSWOutput(NamedTuple):
    logits: torch.Tensor
    global_logits: torch.Tensor
    global_logits_low: torch.Tensor
    local_logits: torch.Tensor
    patch_slices: List[List[SpatialSlices]]
    cell_indices: torch.Tensor
    is_random: torch.Tensor
    selection: torch.Tensor
    objectness: torch.Tensor
    selection_probs: torch.Tensor
    foreground_cells: torch.Tensor
    grid: PatchGrid
    pad_slicer: SpatialSlices


class _GlobalStage(NamedTuple):
    x_padded: torch.Tensor
    pad_slicer: SpatialSlices
    global_low: torch.Tensor
    global_full: Optional[torch.Tensor]  # None until upsampled (inference defers it past the local passes)
    global_padded: Optional[torch.Tensor]
    grid: PatchGrid
    objectness: torch.Tensor
    foreground_cells: torch.Tensor


def first_output(output):
    """Full-resolution output of a network that may return a deep-supervision list/tuple."""
    if isinstance(output, (list, tuple)):
        if len(output) == 0:
            raise ValueError("network returned an empty list/tuple of outputs")
        return output[0]
    return output


def selection_entropy(objectness: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the entropy (nats) of ``softmax(objectness)``, ``objectness (B, G)``.

    Computed from ``log_softmax`` so masked cells (probability ~0) contribute 0 with finite gradients.
    """
    if objectness.ndim != 2:
        raise ValueError(f"objectness must have shape (B, G), got {tuple(objectness.shape)}")
    log_p = torch.log_softmax(objectness, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def _linear_mode(ndim: int) -> str:
    return {1: "linear", 2: "bilinear", 3: "trilinear"}[ndim]


def _conv_op(ndim: int):
    return {2: nn.Conv2d, 3: nn.Conv3d}[ndim]


class ObjectnessHead(nn.Module):
    """Dense objectness map from the global prediction: ``(softmax(global_logits), x_low) -> (B, 1, *g)``.

    Conv(3) - LeakyReLU - Conv(3) - LeakyReLU - Conv(1). No normalisation, so it also works on tiny
    global grids (instance norm needs more than one voxel).
    """

    def __init__(self, num_classes: int, in_channels: int, ndim: int = 3, hidden: int = 16) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ObjectnessHead supports 2 or 3 spatial axes, got ndim={ndim}")
        if hidden <= 0:
            raise ValueError(f"hidden must be positive, got {hidden}")
        conv = _conv_op(ndim)
        self.layers = nn.Sequential(
            conv(num_classes + in_channels, hidden, 3, padding=1), nn.LeakyReLU(0.01),
            conv(hidden, hidden, 3, padding=1), nn.LeakyReLU(0.01),
            conv(hidden, 1, 1))

    def forward(self, global_logits_low: torch.Tensor, x_low: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.cat([torch.softmax(global_logits_low, dim=1), x_low.to(global_logits_low.dtype)],
                                     dim=1))


class FeatureObjectnessHead(nn.Module):
    """Dense objectness map from the global network's penultimate features (paper, Sec. III-B; the authors'
    code: 1x1 convs C -> C/2 -> 1 on the features resized to the patch grid).

    ``features (B, F, *g) -> (B, 1, *g)``, ``g = global_input_size``: Conv(3, F -> hidden) - LeakyReLU -
    Conv(1, hidden -> 1). No normalisation (tiny global grids).
    """

    def __init__(self, feature_channels: int, ndim: int = 3, hidden: int = 16) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"FeatureObjectnessHead supports 2 or 3 spatial axes, got ndim={ndim}")
        if hidden <= 0 or feature_channels <= 0:
            raise ValueError(f"feature_channels and hidden must be positive, got {feature_channels}, {hidden}")
        conv = _conv_op(ndim)
        self.layers = nn.Sequential(conv(feature_channels, hidden, 3, padding=1), nn.LeakyReLU(0.01),
                                    conv(hidden, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def penultimate_feature_layer(net: nn.Module) -> Optional[nn.Module]:
    """The module whose *input* are ``net``'s penultimate (last decoder) features, or None.

    Rule (:data:`FEATURES_RULE`): ``net.decoder.seg_layers`` is a non-empty ``nn.ModuleList`` whose last entry
    is a ``Conv2d``/``Conv3d``: the 1x1 output conv of dynamic-network-architectures' ``UNetDecoder``
    (PlainConvUNet, ResidualEncoderUNet, ... as nnU-Net's ``get_network_from_plans`` builds them), applied to
    the full-resolution decoder features ``(N, F, *shape)``, ``F = in_channels``, with or without deep
    supervision. Any other network: None (no way to know which tensor its features are).
    """
    seg_layers = getattr(getattr(net, "decoder", None), "seg_layers", None)
    if isinstance(seg_layers, nn.ModuleList) and len(seg_layers) > 0 and \
            isinstance(seg_layers[-1], (nn.Conv2d, nn.Conv3d)):
        return seg_layers[-1]
    return None


class _FeatureTap:
    """Forward pre-hook that records its module's input while ``armed`` (NMSWNet arms it for its global pass
    only and clears ``features`` right after). A plain object, not a module: no state-dict entries, and it
    holds no reference to the NMSWNet."""

    def __init__(self) -> None:
        self.armed = False
        self.features: Optional[torch.Tensor] = None

    def __call__(self, module: nn.Module, args) -> None:
        if self.armed:
            self.features = args[0]


class NMSWNet(nn.Module):
    """NMSW-Net wrapper around a global and a local segmentation network (see module docstring).

    Parameters
    ----------
    global_net, local_net: segmentation networks (``(N, in_channels, *shape) -> (N, num_classes, *shape)``).
    num_classes: output channels of both nets.
    in_channels: image channels (the objectness head reads them too).
    patch_size: local patch (= grid cell) shape.
    global_input_size: fixed shape the whole volume is resized to for ``global_net``.
    k_train, k_random: top cells and uniform extra cells per volume in training (paper: 3 + 1).
    k_infer: top cells at inference (paper: 5 or 30).
    tau: Gumbel-softmax temperature (authors' code: 2/3).
    overlap: patch-grid overlap (0.5 = nnU-Net's ``tile_step_size`` 0.5; step = 1 - overlap).
    blend, init_global_weight: see :class:`PatchAggregation` (``blend="local"`` + all cells =
        nnU-Net's sliding window).
    mask_background: offset the objectness of cells that the global prediction calls all background.
    background_penalty: size of that offset (subtracted; finite on purpose).
    infer_only_foreground: in :meth:`predict`, never run more local passes than foreground cells.
    noise_at_eval: add Gumbel noise in eval mode (the authors' code does; default deterministic).
    straight_through: ``"standard"`` or ``"scaled"`` (paper's ``hard * soft``), see ``gumbel_topk``.
    objectness_from: ``"auto"`` (default: ``"features"`` where :func:`penultimate_feature_layer` finds the
        global net's feature layer, else ``"logits"``), ``"features"`` (paper; ``ValueError`` if unreachable)
        or ``"logits"``; see the module docstring. ``objectness_source`` is the one that runs.
    objectness_hidden: channels of the objectness head.
    detach_global_in_aggregation: blend ``global_logits.detach()`` with the patches (authors' code).
    local_batch_size: patches per local-network call in :meth:`predict` (1 = nnU-Net's sliding-window
        batch); the K patch outputs are accumulated as they come, so memory does not grow with K.
        Training runs all K patches of the batch in one call (the loss needs them all).
    """

    def __init__(self, global_net: nn.Module, local_net: nn.Module, num_classes: int, in_channels: int,
                 patch_size: Sequence[int], global_input_size: Sequence[int], k_train: int = 3, k_random: int = 1,
                 k_infer: int = 5, tau: float = 2.0 / 3.0, overlap: float = 0.5, blend: str = "learned",
                 init_global_weight: float = 0.5, mask_background: bool = True, background_penalty: float = 1e4,
                 infer_only_foreground: bool = True, noise_at_eval: bool = False,
                 straight_through: str = "standard", objectness_hidden: int = 16, local_batch_size: int = 1,
                 objectness_from: str = "auto", detach_global_in_aggregation: bool = False) -> None:
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.global_input_size = tuple(int(s) for s in global_input_size)
        ndim = len(self.patch_size)
        if ndim not in (2, 3):
            raise ValueError(f"patch_size must have 2 or 3 spatial axes, got {self.patch_size}")
        if len(self.global_input_size) != ndim:
            raise ValueError(f"global_input_size {self.global_input_size} must have as many axes as patch_size "
                             f"{self.patch_size}")
        if any(p <= 0 for p in self.patch_size) or any(s <= 0 for s in self.global_input_size):
            raise ValueError(f"patch_size {self.patch_size} and global_input_size {self.global_input_size} must be "
                             f"positive")
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if int(in_channels) != in_channels or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        if not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"overlap must lie in [0, 1), got {overlap!r} (step size = 1 - overlap)")
        if int(k_infer) != k_infer or k_infer <= 0:
            raise ValueError(f"k_infer must be a positive integer, got {k_infer!r}")
        if int(local_batch_size) != local_batch_size or local_batch_size < 1:
            raise ValueError(f"local_batch_size must be a positive integer, got {local_batch_size!r}")
        if not float(background_penalty) >= 0:
            raise ValueError(f"background_penalty must be >= 0, got {background_penalty!r}")
        self.global_net = global_net
        self.local_net = local_net
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.ndim = ndim
        self.overlap = float(overlap)
        self.step_size = 1.0 - self.overlap
        self.mask_background = bool(mask_background)
        self.background_penalty = float(background_penalty)
        self.infer_only_foreground = bool(infer_only_foreground)
        self.local_batch_size = int(local_batch_size)
        self.detach_global_in_aggregation = bool(detach_global_in_aggregation)
        if objectness_from not in OBJECTNESS_SOURCES:
            raise ValueError(f"objectness_from must be one of {OBJECTNESS_SOURCES}, got {objectness_from!r}")
        feature_layer = penultimate_feature_layer(global_net) if objectness_from != "logits" else None
        if objectness_from == "features" and feature_layer is None:
            raise ValueError(f"objectness_from='features' needs the global network's penultimate features, which are "
                             f"not reachable in a {type(global_net).__name__}: {FEATURES_RULE}. Use "
                             f"objectness_from='logits' (head on the global softmax) or 'auto'.")
        if feature_layer is not None and (not isinstance(feature_layer, _conv_op(ndim))):
            if objectness_from == "features":
                raise ValueError(f"objectness_from='features': the global network's output conv "
                                 f"{type(feature_layer).__name__} does not have {ndim} spatial axes like the patch")
            feature_layer = None
        self.objectness_from = objectness_from
        self.objectness_source = "features" if feature_layer is not None else "logits"
        self._feature_tap: Optional[_FeatureTap] = None
        if feature_layer is not None:
            self.objectness_head = FeatureObjectnessHead(feature_layer.in_channels, ndim, objectness_hidden)
            self._feature_tap = _FeatureTap()
            feature_layer.register_forward_pre_hook(self._feature_tap)
        else:
            self.objectness_head = ObjectnessHead(self.num_classes, self.in_channels, ndim, objectness_hidden)
        self.topk = GumbelTopK(k_train, k_random, tau, k_eval=k_infer, noise_at_eval=noise_at_eval,
                               straight_through=straight_through)
        self.aggregation = PatchAggregation(self.num_classes, self.patch_size, blend=blend,
                                            init_global_weight=init_global_weight)
        self._grid_cache: Dict[Tuple, Tuple[PatchGrid, np.ndarray]] = {}

    @property
    def k_infer(self) -> int:
        return self.topk.k_eval

    def extra_repr(self) -> str:
        return (f"patch_size={self.patch_size}, global_input_size={self.global_input_size}, "
                f"overlap={self.overlap}, mask_background={self.mask_background}, "
                f"infer_only_foreground={self.infer_only_foreground}, objectness_source={self.objectness_source!r}, "
                f"detach_global_in_aggregation={self.detach_global_in_aggregation}")

    # ------------------------------------------------------------------ helpers
    def _resize(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if tuple(x.shape[2:]) == tuple(size):
            return x
        return F.interpolate(x, size=tuple(size), mode=_linear_mode(self.ndim), align_corners=False)

    def resize_to_global(self, tensor: torch.Tensor, is_label: bool = False) -> torch.Tensor:
        """Resize ``(B, C, *S)`` to ``global_input_size`` (linear for images, nearest for labels)."""
        self._check_volume(tensor, check_channels=False)
        if is_label:
            return F.interpolate(tensor.float(), size=self.global_input_size, mode="nearest").to(tensor.dtype)
        return self._resize(tensor, self.global_input_size)

    def _check_volume(self, x: torch.Tensor, check_channels: bool = True) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 + self.ndim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)
            raise ValueError(f"expected a tensor of shape (B, C, *spatial) with {self.ndim} spatial axes, "
                             f"got {shape}")
        if check_channels and x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]} (shape "
                             f"{tuple(x.shape)})")

    def _grid_and_boxes(self, padded: Tuple[int, ...], pad_slicer: SpatialSlices,
                        spatial: Tuple[int, ...]) -> Tuple[PatchGrid, np.ndarray]:
        key = (padded, spatial)
        if key not in self._grid_cache:
            grid = PatchGrid(padded, self.patch_size, self.step_size)
            boxes = grid.cell_boxes([s.start for s in pad_slicer], spatial, self.global_input_size)
            if len(self._grid_cache) > 64:  # volumes of many shapes: keep the cache bounded
                self._grid_cache.clear()
            self._grid_cache[key] = (grid, boxes)
        return self._grid_cache[key]

    def crop_patches(self, volume: torch.Tensor, cell_indices: torch.Tensor, pad_value: float = 0) -> torch.Tensor:
        """Crop the selected cells from ``volume (B, C', *S)`` (e.g. the segmentation target) with the
        same padding and grid as the forward pass -> ``(B, K, C', *patch)``."""
        self._check_volume(volume, check_channels=False)
        padded, _ = pad_to_patch_size(volume, self.patch_size, pad_value)
        grid = PatchGrid(padded.shape[2:], self.patch_size, self.step_size)
        if cell_indices.ndim != 2 or cell_indices.shape[0] != volume.shape[0]:
            raise ValueError(f"cell_indices must have shape (B={volume.shape[0]}, K), got "
                             f"{tuple(cell_indices.shape)}")
        crops = [torch.stack([padded[(b, slice(None), *grid.cell_slices(i))] for i in row.tolist()])
                 for b, row in enumerate(cell_indices)]
        return torch.stack(crops)

    # ------------------------------------------------------------------ stages
    def _full_size_global(self, global_low: torch.Tensor, spatial: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Global logits upsampled to the volume ``spatial`` and padded like it: ``(full, padded)``."""
        global_full = self._resize(global_low, spatial)
        return global_full, pad_to_patch_size(global_full, self.patch_size)[0]

    def _global_stage(self, x_high: torch.Tensor, x_low: Optional[torch.Tensor], upsample: bool = True) -> _GlobalStage:
        self._check_volume(x_high)
        batch = x_high.shape[0]
        spatial = tuple(x_high.shape[2:])
        if x_low is None:
            x_low = self._resize(x_high, self.global_input_size)
        elif tuple(x_low.shape) != (batch, self.in_channels, *self.global_input_size):
            raise ValueError(f"x_low must have shape {(batch, self.in_channels, *self.global_input_size)} "
                             f"(B, C_in, *global_input_size), got {tuple(x_low.shape)}")
        global_low, features = self._global_logits_and_features(x_low)
        expected = (batch, self.num_classes, *self.global_input_size)
        if tuple(global_low.shape) != expected:
            raise ValueError(f"global_net returned shape {tuple(global_low.shape)}, expected {expected}")

        global_full, global_padded = self._full_size_global(global_low, spatial) if upsample else (None, None)
        x_padded, pad_slicer = pad_to_patch_size(x_high, self.patch_size)
        grid, boxes = self._grid_and_boxes(tuple(x_padded.shape[2:]), pad_slicer, spatial)

        # Objectness: mean of the dense score map over each cell's footprint on the global grid.
        if self.objectness_source == "features":
            score_map = self.objectness_head(self._resize(features, self.global_input_size))
        else:
            score_map = self.objectness_head(global_low, x_low)
        del features
        box_volumes = torch.as_tensor(np.prod(boxes[..., 1] - boxes[..., 0], axis=-1), dtype=score_map.dtype,
                                      device=score_map.device)
        scores = box_sums(score_map, boxes)[:, 0] / box_volumes  # (B, G)
        if self.mask_background:
            foreground = (global_low.detach().argmax(1, keepdim=True) != 0).to(score_map.dtype)
            foreground_cells = box_sums(foreground, boxes)[:, 0] > 0.5
            scores = scores - self.background_penalty * (~foreground_cells).to(scores.dtype)
        else:
            foreground_cells = torch.ones_like(scores, dtype=torch.bool)
        return _GlobalStage(x_padded, pad_slicer, global_low, global_full, global_padded, grid, scores,
                            foreground_cells)

    def _global_logits_and_features(self, x_low: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``global_net(x_low)`` (element 0 of a list) and, for ``objectness_source == "features"``, the input of
        its feature layer in this very pass (the tap is armed for the call only and emptied at once)."""
        tap = self._feature_tap
        if tap is None:
            return first_output(self.global_net(x_low)), None
        tap.armed, tap.features = True, None
        try:
            global_low = first_output(self.global_net(x_low))
            features = tap.features
        finally:
            tap.armed, tap.features = False, None
        if features is None:
            raise RuntimeError("objectness from features: the global network's feature layer (decoder.seg_layers[-1] "
                               "at construction) did not run in its forward pass; was global_net replaced after the "
                               "NMSWNet was built? Build a new NMSWNet with the new global network.")
        return global_low, features

    def _aggregation_global(self, global_padded: torch.Tensor) -> torch.Tensor:
        """The global logits the aggregation blends: detached if ``detach_global_in_aggregation``."""
        return global_padded.detach() if self.detach_global_in_aggregation else global_padded

    def _local_logits(self, crops: torch.Tensor) -> torch.Tensor:
        """The local net on ``(P, C_in, *patch)`` crops -> ``(P, C, *patch)`` logits (highest resolution)."""
        local = first_output(self.local_net(crops))
        expected = (crops.shape[0], self.num_classes, *self.patch_size)
        if tuple(local.shape) != expected:
            raise ValueError(f"local_net returned shape {tuple(local.shape)}, expected {expected}")
        return local

    def _local_stage(self, stage: _GlobalStage, selection: TopKSelection) -> NMSWOutput:
        batch, num_patches = selection.indices.shape
        grid = stage.grid
        # Forward value 1.0 (standard ST; "scaled": the soft weight); backward carries the crop gradient to the scores.
        weights = selection.selection.gather(2, selection.indices.unsqueeze(-1)).squeeze(-1)  # (B, K)
        patch_slices = [[grid.cell_slices(i) for i in row.tolist()] for row in selection.indices]
        crops = torch.stack([stage.x_padded[(b, slice(None), *patch_slices[b][k])] *
                             weights[b, k].to(stage.x_padded.dtype)
                             for b in range(batch) for k in range(num_patches)])
        local = self._local_logits(crops).reshape(batch, num_patches, self.num_classes, *self.patch_size)
        aggregated = self.aggregation(self._aggregation_global(stage.global_padded), local, patch_slices)
        logits = aggregated[(slice(None), slice(None), *stage.pad_slicer)]
        return NMSWOutput(logits=logits, global_logits=stage.global_full, global_logits_low=stage.global_low,
                          local_logits=local, patch_slices=patch_slices, cell_indices=selection.indices,
                          is_random=selection.is_random, selection=selection.selection,
                          objectness=stage.objectness, selection_probs=torch.softmax(stage.objectness, dim=-1),
                          foreground_cells=stage.foreground_cells, grid=grid, pad_slicer=stage.pad_slicer)

    def _streamed_local_logits(self, stage: _GlobalStage, cells: Sequence[int]) -> torch.Tensor:
        """Inference for one volume: the local net on ``cells`` in chunks of ``local_batch_size``, each
        chunk added into the aggregation sums at once (same result as :meth:`_local_stage`).

        The sums and the blend cover only the bounding box of the selected cells: outside it no patch
        contributes, so the output there is the upsampled global logits, written once. (Full-size
        accumulators and blending cost about as much as the global pass on a large CT volume.) The
        global logits are upsampled after the local passes, so the two never occupy memory together.
        """
        grid = stage.grid
        cell_slices = [grid.cell_slices(i) for i in cells]
        lower = [min(s[axis].start for s in cell_slices) for axis in range(self.ndim)]
        upper = [max(s[axis].stop for s in cell_slices) for axis in range(self.ndim)]
        box = (slice(None), slice(None), *(slice(lo, hi) for lo, hi in zip(lower, upper)))
        box_shape = tuple(hi - lo for lo, hi in zip(lower, upper))
        in_box = [tuple(slice(s.start - lo, s.stop - lo) for s, lo in zip(slices, lower)) for slices in cell_slices]
        sums = None
        for start in range(0, len(cells), self.local_batch_size):
            chunk = slice(start, start + self.local_batch_size)
            crops = torch.stack([stage.x_padded[(0, slice(None), *s)] for s in cell_slices[chunk]])
            local = self._local_logits(crops)
            _require_finite(local, f"the local network's output for grid cells {list(cells[chunk])}")
            sums = self.aggregation.accumulate(local[None], [in_box[chunk]], box_shape, sums)
            del local, crops
        # upsampled only now: the full-size global logits are not held during the local passes
        spatial = tuple(s.stop - s.start for s in stage.pad_slicer)
        aggregated = self._aggregation_global(self._full_size_global(stage.global_low, spatial)[1])
        self.aggregation.blend_sums(aggregated[box], *sums, in_place=True)  # writes into the box of aggregated
        return aggregated[(slice(None), slice(None), *stage.pad_slicer)]

    # ------------------------------------------------------------------ public
    def forward(self, x_high: torch.Tensor, x_low: Optional[torch.Tensor] = None, k: Optional[int] = None,
                k_random: Optional[int] = None) -> NMSWOutput:
        stage = self._global_stage(x_high, x_low)
        selection = self.topk(stage.objectness, k=k, k_random=k_random)
        return self._local_stage(stage, selection)

    @torch.no_grad()
    def predict(self, volume: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
        """Full-size logits for ``(C_in, *S)`` -> ``(C, *S)`` or ``(B, C_in, *S)`` -> ``(B, C, *S)``.

        No sliding window: one global pass plus ``K`` local passes per volume (see module docstring).
        """
        single = isinstance(volume, torch.Tensor) and volume.ndim == 1 + self.ndim
        batch_volume = volume[None] if single else volume
        self._check_volume(batch_volume)
        k = self.k_infer if k is None else k
        if int(k) != k or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        was_training = self.training
        self.eval()
        try:
            outputs = []
            for b in range(batch_volume.shape[0]):
                stage = self._global_stage(batch_volume[b:b + 1], None, upsample=False)
                _require_finite(stage.global_low, "the global network's output")
                k_here = min(int(k), stage.grid.num_cells)
                if self.infer_only_foreground and self.mask_background:
                    k_here = min(k_here, int(stage.foreground_cells.sum()))
                if k_here == 0:
                    outputs.append(self._full_size_global(stage.global_low, tuple(batch_volume.shape[2:]))[0])
                    continue
                selection = gumbel_topk(stage.objectness, k_here, self.topk.tau, 0, self.topk.noise_at_eval,
                                        self.topk.straight_through)
                outputs.append(self._streamed_local_logits(stage, selection.indices[0].tolist()))
        finally:
            self.train(was_training)
        logits = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # no full-size copy for one volume
        return logits[0] if single else logits


def _require_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise a clear error for NaN/inf in ``tensor``. Checking the network outputs suffices for the
    predicted logits: resizing and Gaussian blending only form weighted averages of them."""
    if not torch.isfinite(tensor).all():
        raise RuntimeError(f"NMSW inference produced non-finite values (NaN/inf) in {what}; check the "
                           f"checkpoint and the input")
