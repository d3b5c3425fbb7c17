"""NMSW-Net inference inside nnU-Net's stock predictor: no sliding window for NMSW networks.

Reference
---------
Jeon, Yang, Fu, Feng, "No More Sliding Window: Efficient 3D Medical Image Segmentation with
Differentiable Top-k Patch Sampling" (NMSW-Net), Sec. III: one global pass on the downsampled
volume plus ``K`` local passes on the top-K patches replace the sliding window.

How it hooks into nnU-Net
-------------------------
``nnUNetPredictor`` is hard-wired in ``nnUNetv2_predict`` and in the trainer's final validation
(``perform_actual_validation``). Both end in ``predictor.predict_sliding_window_return_logits(
input_image)``: ``(C_in, *S)`` preprocessed tensor in, ``(C, *S)`` logits out. :func:`install`
wraps that method on the class (idempotent):

- if the predictor's network (after unwrapping DDP / ``torch.compile``) is an
  :class:`~nnunet_moe.networks.nmsw.NMSWNet`, the logits come from ``network.predict(volume, k=K)``
  (one global pass + at most ``K`` local passes, deterministic top-K); a volume smaller than one
  patch is zero-padded inside ``NMSWNet.predict`` and the padding removed again, as nnU-Net does;
- any other network takes nnU-Net's original sliding-window method, unchanged.

Test-time mirroring: when the predictor has ``use_mirroring`` (nnU-Net's default; ``--disable_tta``
turns it off) and ``allowed_mirroring_axes``, every flip combination is predicted with NMSW and the
flipped-back logits are averaged, exactly like nnU-Net's ``_internal_maybe_mirror_and_predict``
(3D: 8 NMSW passes). Each pass picks its own top-K cells. ``NNUNET_MOE_NMSW_TTA=0`` switches
mirroring off for NMSW networks everywhere, including the trainer's final validation (which nnU-Net
always runs with mirroring); useful on CPUs.

Options (environment variables, read at every call)
---------------------------------------------------
- ``NNUNET_MOE_NMSW_K``: number of local patches ``K`` (default 5, the paper's small setting; the
  paper also reports 30). Must be a positive integer (else ``ValueError``); a ``K`` larger than the
  volume's patch grid is clamped to the grid, and ``NMSWNet.predict`` never runs more local passes
  than cells in which the global prediction contains foreground (a volume without any gets the
  upsampled global logits).
- ``NNUNET_MOE_NMSW_TEST_NOISE``: ``1`` adds Gumbel noise to the selection at test time (the
  authors' code does; stochastic output), ``0``/unset keeps the deterministic top-K.

Every case prints one line ``nnunet-moe NMSW: ...`` (shape, K, local passes, no sliding window), so
logs show that NMSW was used; ``CALLS`` counts NMSW and sliding-window calls in this process.

Checkpoints from other trainers
-------------------------------
nnU-Net rebuilds the network from the trainer named *inside* the checkpoint (``trainer_name``), not
from ``-tr``. A plain nnU-Net checkpoint therefore loads a plain network, which takes the original
sliding-window path (the stock command does not even import this module then). Two mismatches are
turned into clear errors by the wrapped ``initialize_from_trained_model_folder``:

- the checkpoint names an NMSW trainer but its weights do not fit the NMSW network (e.g. weights of a
  plain nnU-Net copied into the folder): ``ValueError`` naming the checkpoint file and the trainer
  that wrote it, instead of ``load_state_dict``'s list of missing keys;
- the results folder belongs to an NMSW trainer (``nnUNetTrainerNMSW...__plans__configuration``) but
  the checkpoint was written by a non-NMSW trainer (only detectable in a process where this module
  was installed, e.g. the Python API or ``nnunet-moe benchmark``).

For these messages the checkpoint is read again with ``weights_only=True`` (numpy scalars allowed);
a file holding other objects names no trainer unless ``NNUNET_MOE_TRUST_CHECKPOINTS=1``.
"""
from __future__ import annotations

import itertools
import os
from collections import Counter
from typing import Optional, Tuple

import torch

from nnunet_moe.networks.nmsw import NMSWNet
from nnunet_moe.networks.unwrap import unwrap_network

__all__ = ["install", "is_installed", "nmsw_k_from_env", "test_noise_from_env", "tta_from_env", "predict_with_nmsw",
           "register_nmsw_trainer", "is_nmsw_trainer_name", "unwrap", "K_ENV", "NOISE_ENV", "TTA_ENV", "DEFAULT_K",
           "CALLS", "LOG_PREFIX"]

K_ENV = "NNUNET_MOE_NMSW_K"
NOISE_ENV = "NNUNET_MOE_NMSW_TEST_NOISE"
TTA_ENV = "NNUNET_MOE_NMSW_TTA"
DEFAULT_K = 5  # paper, Table I (k=5 and k=30)
LOG_PREFIX = "nnunet-moe NMSW:"

CALLS: Counter = Counter()  # "nmsw" / "sliding_window" calls of predict_sliding_window_return_logits
_NMSW_TRAINER_NAMES: set = set()


def register_nmsw_trainer(name: str) -> None:
    """Record a trainer class name that writes NMSW checkpoints (the trainer module registers its classes)."""
    _NMSW_TRAINER_NAMES.add(str(name))


def is_nmsw_trainer_name(name: str) -> bool:
    """True for a registered NMSW trainer name, also with a short-schedule suffix
    ``_<E>epochs[_<I>iters][_bs<B>][_lr<X>]`` (the grammar of :func:`~nnunet_moe.trainer_names.parse_short_name`)."""
    from nnunet_moe.trainer_names import parse_short_name

    if name in _NMSW_TRAINER_NAMES:
        return True
    try:
        parsed = parse_short_name(name)
    except ValueError:  # e.g. "_0epochs": not a trainer nnU-Net could have run
        return False
    return parsed is not None and parsed[0] in _NMSW_TRAINER_NAMES


unwrap = unwrap_network  # the plain module behind DDP and torch.compile wrappers


def nmsw_k_from_env(default: int = DEFAULT_K) -> int:
    """``K`` from ``NNUNET_MOE_NMSW_K`` (unset or empty: ``default``); ``ValueError`` unless a positive integer."""
    raw = os.environ.get(K_ENV, "").strip()
    if raw == "":
        return int(default)
    try:
        k = int(raw)
    except ValueError:
        raise ValueError(f"{K_ENV}={raw!r} is not an integer; set it to the number of local patches per volume "
                         f"(a positive integer, e.g. {DEFAULT_K})") from None
    if k <= 0:
        raise ValueError(f"{K_ENV}={raw!r}: the number of local patches K must be >= 1 (K larger than the patch "
                         f"grid is clamped to the grid)")
    return k


def _switch_from_env(name: str, default: bool, meaning: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}={raw!r} is not a switch; use 1 or 0 ({meaning})")


def test_noise_from_env() -> bool:
    """``NNUNET_MOE_NMSW_TEST_NOISE``: 1/true/yes -> Gumbel noise at test time; 0/false/no/unset -> none."""
    return _switch_from_env(NOISE_ENV, False, "1: Gumbel noise at test time, 0: deterministic top-K, the default")


def tta_from_env() -> bool:
    """``NNUNET_MOE_NMSW_TTA``: 0 -> no test-time mirroring for NMSW; 1/unset -> as the predictor says."""
    return _switch_from_env(TTA_ENV, True, "0: no test-time mirroring for NMSW networks, 1: follow the predictor")


def _mirror_axes(predictor, ndim: int) -> Optional[Tuple[int, ...]]:
    axes = predictor.allowed_mirroring_axes if predictor.use_mirroring and tta_from_env() else None
    if not axes:
        return None
    if max(axes) >= ndim:
        raise ValueError(f"mirroring axes {tuple(axes)} do not fit a volume with {ndim} spatial axes")
    return tuple(int(a) for a in axes)


def predict_with_nmsw(predictor, network: NMSWNet, input_image: torch.Tensor) -> torch.Tensor:
    """NMSW logits ``(C, *S)`` for ``input_image (C_in, *S)`` with the predictor's device and mirroring."""
    k = nmsw_k_from_env()
    noise = test_noise_from_env()
    # Region-based label sets (sigmoid outputs) have no background channel to mask cells with.
    mask_background = network.mask_background and not (predictor.label_manager is not None
                                                      and predictor.label_manager.has_regions)
    saved = network.topk.noise_at_eval, network.mask_background
    network.topk.noise_at_eval, network.mask_background = noise, mask_background
    spatial_axes = input_image.ndim - 1
    mirror_axes = _mirror_axes(predictor, spatial_axes)
    combos = [()] if mirror_axes is None else [()] + [
        c for i in range(len(mirror_axes)) for c in itertools.combinations(mirror_axes, i + 1)]
    try:
        with torch.no_grad():
            volume = input_image.to(predictor.device)
            logits = None
            for axes in combos:
                dims = [a + 1 for a in axes]  # spatial axis a is tensor dim a + 1 of (C, *S)
                x = torch.flip(volume, dims) if dims else volume
                out = network.predict(x, k=k)
                out = torch.flip(out, dims) if dims else out
                logits = out.float() if logits is None else logits + out.float()
            logits /= len(combos)
    finally:
        network.topk.noise_at_eval, network.mask_background = saved
    CALLS["nmsw"] += 1
    print(f"{LOG_PREFIX} volume {tuple(input_image.shape[1:])}: global pass + top-K={k} local patches "
          f"(patch {network.patch_size}, {len(combos)} mirror pass(es), Gumbel noise {'on' if noise else 'off'}), "
          f"no sliding window", flush=True)
    return logits


def _wrap_predict(original):
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        network = unwrap(self.network) if self.network is not None else None
        if not isinstance(network, NMSWNet):
            CALLS["sliding_window"] += 1
            return original(self, input_image)
        if not isinstance(input_image, torch.Tensor) or input_image.ndim != 1 + network.ndim:
            shape = tuple(input_image.shape) if hasattr(input_image, "shape") else type(input_image)
            raise ValueError(f"NMSW inference expects a preprocessed (C, *spatial) tensor with {network.ndim} spatial "
                             f"axes, got {shape}")
        self.network = self.network.to(self.device)
        self.network.eval()
        use_autocast = self.device.type == "cuda"  # like nnU-Net: autocast only on CUDA
        with torch.autocast(self.device.type, enabled=True) if use_autocast else _null_context():
            return predict_with_nmsw(self, network, input_image)

    predict_sliding_window_return_logits.__wrapped__ = original
    predict_sliding_window_return_logits._nnunet_moe_nmsw = True
    predict_sliding_window_return_logits.__doc__ = (
        "nnunet-moe: NMSW-Net inference (no sliding window) for NMSW networks, else nnU-Net's original "
        "sliding window.\n\n" + (original.__doc__ or ""))
    return predict_sliding_window_return_logits


class _null_context:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _checkpoint_trainer_name(folder: str, use_folds, checkpoint_name: str) -> Tuple[str, str]:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    if use_folds is None:
        use_folds = nnUNetPredictor.auto_detect_available_folds(folder, checkpoint_name)
    if isinstance(use_folds, (str, int)):
        use_folds = [use_folds]
    fold = use_folds[0]
    fold = int(fold) if fold != "all" else fold
    path = os.path.join(folder, f"fold_{fold}", checkpoint_name)
    from nnunet_moe.pretrained.checkpoint_io import numpy_scalar_globals, read_checkpoint

    try:  # weights_only: nnU-Net's checkpoints need numpy scalars besides tensors, nothing else
        checkpoint = read_checkpoint(path, allowed_globals=numpy_scalar_globals())
    except ValueError as error:  # refused or unreadable: name no trainer rather than unpickle it
        return path, f"<unknown: {error}>"
    return path, str(checkpoint.get("trainer_name", "<unknown>"))


def _wrap_initialize(original):
    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds,
                                             checkpoint_name: str = "checkpoint_final.pth"):
        try:
            result = original(self, model_training_output_dir, use_folds, checkpoint_name)
        except RuntimeError as error:
            if "state_dict" not in str(error):
                raise
            path, trainer = _checkpoint_trainer_name(model_training_output_dir, use_folds, checkpoint_name)
            if not is_nmsw_trainer_name(trainer):
                raise
            raise ValueError(
                f"checkpoint {path} was written by trainer {trainer!r} (an NMSW-Net trainer) but its weights do not "
                f"fit the NMSW-Net network that trainer builds (global_net/local_net/objectness_head/aggregation). "
                f"It was probably copied from another trainer's results folder; predict it with the trainer that "
                f"trained it (-tr <that trainer>) or retrain with -tr {trainer}.") from error
        folder_trainer = os.path.basename(os.path.normpath(model_training_output_dir)).split("__")[0]
        if is_nmsw_trainer_name(folder_trainer) and not isinstance(unwrap(self.network), NMSWNet):
            path, trainer = _checkpoint_trainer_name(model_training_output_dir, use_folds, checkpoint_name)
            raise ValueError(
                f"results folder {model_training_output_dir} belongs to NMSW trainer {folder_trainer!r}, but its "
                f"checkpoint {path} was written by trainer {trainer!r}, which builds a "
                f"{type(unwrap(self.network)).__name__}, not an NMSW-Net. Predict it with -tr {trainer} (sliding "
                f"window) or train with -tr {folder_trainer}.")
        return result

    initialize_from_trained_model_folder.__wrapped__ = original
    initialize_from_trained_model_folder._nnunet_moe_nmsw = True
    initialize_from_trained_model_folder.__doc__ = original.__doc__
    return initialize_from_trained_model_folder


def is_installed() -> bool:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    # marked wrappers (not a module flag) so a reloaded module never wraps twice
    return getattr(nnUNetPredictor.predict_sliding_window_return_logits, "_nnunet_moe_nmsw", False)


def install() -> None:
    """Patch ``nnUNetPredictor`` once per process (calling it again changes nothing)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    if is_installed():
        return
    nnUNetPredictor.predict_sliding_window_return_logits = _wrap_predict(
        nnUNetPredictor.predict_sliding_window_return_logits)
    if not getattr(nnUNetPredictor.initialize_from_trained_model_folder, "_nnunet_moe_nmsw", False):
        nnUNetPredictor.initialize_from_trained_model_folder = _wrap_initialize(
            nnUNetPredictor.initialize_from_trained_model_folder)
