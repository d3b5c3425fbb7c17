"""NMSW-Net inference inside nnU-Net: :class:`NMSWPredictor`, an ``nnUNetPredictor`` without a sliding window.

Reference
---------
Jeon, Yang, Fu, Feng, "No More Sliding Window: Efficient 3D Medical Image Segmentation with
Differentiable Top-k Patch Sampling" (NMSW-Net), Sec. III: one global pass on the downsampled
volume plus ``K`` local passes on the top-K patches replace the sliding window.

What it changes
---------------
For a network that is an :class:`~nnunet_moe.networks.nmsw.NMSWNet` (after unwrapping DDP /
``torch.compile``), two steps of nnU-Net's ``predict_sliding_window_return_logits`` change:
``_internal_get_sliding_window_slicers`` returns one tile, the whole volume, and
``_internal_predict_sliding_window_return_logits`` predicts that tile with ``NMSWNet.predict``
(global pass + at most ``K`` local passes, deterministic top-K), called by nnU-Net's own
``_internal_maybe_mirror_and_predict``. Everything else is nnU-Net's, so its options hold:

- test-time mirroring: ``use_mirroring`` (``--disable_tta`` turns it off) over
  ``allowed_mirroring_axes``, every flip predicted with NMSW and averaged (3D: 8 NMSW passes,
  each picking its own cells); ``nmsw_mirroring=False`` switches it off for NMSW only (the
  trainer's final validation always mirrors);
- ``perform_everything_on_device`` and nnU-Net's CPU fall-back after an error on the device (CUDA
  out of memory): the retry keeps each pass's logits on the CPU and sums the mirror passes there;
- autocast on CUDA and fp16 logits (nnU-Net accumulates its sliding window in fp16);
- a volume smaller than one patch is zero-padded by nnU-Net (``pad_nd_image``, centred) and the
  padding removed again, as every training sample is padded to the full size;
- ``tile_step_size`` (``-step_size``) does not apply: the candidate-patch grid (overlap 0.5) is
  part of the trained network; a value other than the network's step is said in the log line.

Any other network takes nnU-Net's methods unchanged. Every NMSW case prints one line
``nnunet-moe NMSW: ...`` (shape, K, mirror passes, no sliding window); ``CALLS`` counts this
class's NMSW and sliding-window predictions in this process.

Options (constructor arguments, also attributes): ``nmsw_k`` (local patches ``K``; None: the
network's ``k_infer``, 5 for ``nnUNetTrainerNMSW``, the paper's small setting; clamped to the patch
grid, and ``NMSWNet.predict`` never runs more local passes than cells whose global prediction
contains foreground), ``nmsw_test_noise`` (Gumbel noise at test time, as the authors' code; default
off), ``nmsw_mirroring``. nnU-Net's commands take them from the environment, parsed once per
predictor by :func:`options_from_env`: ``NNUNET_MOE_NMSW_K``, ``NNUNET_MOE_NMSW_TEST_NOISE=1``,
``NNUNET_MOE_NMSW_TTA=0``.

How nnU-Net's commands get one, and why this mechanism
------------------------------------------------------
nnU-Net hard-wires ``nnUNetPredictor``, so something must reach the instance it makes:

- ``nnUNetv2_predict`` (any ``initialize_from_trained_model_folder``): nnU-Net imports the
  checkpoint's trainer and calls its ``build_network_architecture``, the first code of ours that
  runs in a fresh process. The NMSW trainers' version calls :func:`adopt_loading_predictor`, which finds the
  loading predictor as ``self`` of nnU-Net's ``initialize_from_trained_model_folder`` on the call
  stack, checks that the checkpoint's weights fit the NMSW network (else a ``ValueError`` naming the
  checkpoint file and its trainer) and makes that one instance an ``NMSWPredictor`` (``__class__``)
  with the options of the environment. No other predictor changes, and the instance changes back
  if it is initialised again with a network that is not NMSW.
- The trainer's final validation: ``nnUNetTrainer.perform_actual_validation`` makes its predictor
  from the name ``nnUNetPredictor`` in its module; the NMSW trainer runs it inside
  :func:`validation_predictors`, which binds that name to an ``NMSWPredictor`` factory for the call
  and restores it on exit, also after an exception.
- The Python API constructs ``NMSWPredictor`` directly; :func:`nmsw_prediction` gives an existing
  predictor NMSW's behaviour for a ``with`` block (``nnunet-moe benchmark``).

Rejected: (a) wrapping ``nnUNetPredictor``'s methods for the whole process when the trainer is
imported (this module's former ``install()``): it leaked into every other model of the process,
was installed too late in a fresh ``nnUNetv2_predict`` for its checkpoint check to fire, and
bypassed nnU-Net's device fall-back and fp16 logits; (b) an NMSW network that declares the whole
volume as its input so that nnU-Net's tiling hands it the volume: the tile size is the plans' patch
size, which is also NMSW's local patch, fixed while volumes vary, and the network's forward must
return the :class:`~nnunet_moe.networks.nmsw.NMSWOutput` that training needs.

Checkpoints of other trainers
-----------------------------
nnU-Net rebuilds the network from the trainer named *inside* the checkpoint, not from ``-tr``.
NMSW weights that do not fit (e.g. a plain nnU-Net's copied into the folder) are a clear error, also
in a fresh ``nnUNetv2_predict`` (see above). An NMSW results folder (``nnUNetTrainerNMSW...__plans__
configuration``) holding a checkpoint of a non-NMSW trainer is an error when an ``NMSWPredictor``
loads it (Python API); ``nnunet-moe benchmark`` reports that mode ``nmsw`` needs an NMSW-Net. The
stock ``nnUNetv2_predict`` builds the network of the trainer the checkpoint names and runs no NMSW
code for it (for nnU-Net's own trainers no code of ours at all), so it predicts those weights with
that network and the sliding window, without an NMSW log line: catching it there would need a hook
in every ``nnUNetv2_predict`` process, the process-wide patch this module avoids.
"""
from __future__ import annotations

import contextlib
import io
import os
from collections import Counter
from numbers import Integral
from typing import Optional

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.helpers import empty_cache

from nnunet_moe.inference.loading import loading_locals
from nnunet_moe.networks.nmsw import NMSWNet
from nnunet_moe.networks.unwrap import unwrap_network

__all__ = ["NMSWPredictor", "adopt_loading_predictor", "validation_predictors", "nmsw_prediction",
           "options_from_env", "nmsw_k_from_env", "test_noise_from_env", "tta_from_env", "register_nmsw_trainer",
           "is_nmsw_trainer_name", "unwrap", "K_ENV", "NOISE_ENV", "TTA_ENV", "DEFAULT_K", "CALLS", "LOG_PREFIX"]

K_ENV = "NNUNET_MOE_NMSW_K"
NOISE_ENV = "NNUNET_MOE_NMSW_TEST_NOISE"
TTA_ENV = "NNUNET_MOE_NMSW_TTA"
DEFAULT_K = 5  # paper, Table I (k=5 and k=30)
LOG_PREFIX = "nnunet-moe NMSW:"

CALLS: Counter = Counter()  # NMSWPredictor predictions in this process: "nmsw" / "sliding_window"
_NMSW_TRAINER_NAMES: set = set()
_OPTION_DEFAULTS = {"nmsw_k": None, "nmsw_test_noise": False, "nmsw_mirroring": True}


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


# ----------------------------------------------------------------------------- options
def nmsw_k_from_env(default: Optional[int] = DEFAULT_K) -> Optional[int]:
    """``K`` from ``NNUNET_MOE_NMSW_K`` (unset or empty: ``default``); ``ValueError`` unless a positive integer."""
    raw = os.environ.get(K_ENV, "").strip()
    if raw == "":
        return default if default is None else int(default)
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


def options_from_env() -> dict:
    """The three ``NMSWPredictor`` options from the environment (unset: the defaults; K unset: the network's)."""
    return {"nmsw_k": nmsw_k_from_env(default=None), "nmsw_test_noise": test_noise_from_env(),
            "nmsw_mirroring": tta_from_env()}


def _checked_options(nmsw_k, nmsw_test_noise, nmsw_mirroring) -> dict:
    if nmsw_k is not None and (isinstance(nmsw_k, bool) or not isinstance(nmsw_k, Integral) or nmsw_k < 1):
        raise ValueError(f"nmsw_k={nmsw_k!r}: the number of local patches K must be a positive integer (None: the "
                         f"network's k_infer)")
    return {"nmsw_k": None if nmsw_k is None else int(nmsw_k), "nmsw_test_noise": bool(nmsw_test_noise),
            "nmsw_mirroring": bool(nmsw_mirroring)}


# ----------------------------------------------------------------------------- the predictor
class _WholeVolume:
    """What nnU-Net's ``_internal_maybe_mirror_and_predict`` calls as ``self.network`` during an NMSW
    prediction: ``NMSWNet.predict`` on the whole (possibly flipped) volume, logits on ``results_device``."""

    def __init__(self, network: NMSWNet, k: int, results_device: torch.device):
        self.network, self.k, self.results_device, self.calls = network, k, results_device, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.network.predict(x, k=self.k).to(self.results_device)


class NMSWPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` that predicts NMSW networks without a sliding window (see module docstring);
    nnU-Net's positional and keyword arguments, plus ``nmsw_k``, ``nmsw_test_noise``, ``nmsw_mirroring``."""

    def __init__(self, *args, nmsw_k: Optional[int] = None, nmsw_test_noise: bool = False,
                 nmsw_mirroring: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__.update(_checked_options(nmsw_k, nmsw_test_noise, nmsw_mirroring))

    def nmsw_network(self) -> Optional[NMSWNet]:
        """The NMSW network behind ``self.network``, or None for any other network."""
        network = unwrap(self.network) if self.network is not None else None
        return network if isinstance(network, NMSWNet) else None

    # -------------------------------------------------------------- initialisation
    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds,
                                             checkpoint_name: str = "checkpoint_final.pth"):
        super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        if self.nmsw_network() is None:
            folder_trainer = os.path.basename(os.path.normpath(model_training_output_dir)).split("__")[0]
            if _names_nmsw_trainer(folder_trainer):
                path = _checkpoint_path(model_training_output_dir, use_folds if use_folds is not None else "*",
                                        checkpoint_name)
                raise ValueError(
                    f"results folder {model_training_output_dir} belongs to NMSW trainer {folder_trainer!r}, but its "
                    f"checkpoint {path} was written by trainer {self.trainer_name!r}, which builds a "
                    f"{type(unwrap(self.network)).__name__}, not an NMSW-Net. Predict it with -tr {self.trainer_name} "
                    f"(sliding window) or train with -tr {folder_trainer}.")
            _drop_adoption(self)

    def manual_initialization(self, network, *args, **kwargs):
        super().manual_initialization(network, *args, **kwargs)
        if self.nmsw_network() is None:
            _drop_adoption(self)

    # -------------------------------------------------------------- prediction
    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        network = self.nmsw_network()
        if network is None:
            CALLS["sliding_window"] += 1
            return super().predict_sliding_window_return_logits(input_image)
        if not isinstance(input_image, torch.Tensor) or input_image.ndim != 4 or network.ndim != 3:
            shape = tuple(input_image.shape) if hasattr(input_image, "shape") else type(input_image)
            raise ValueError(f"NMSW inference in nnU-Net's predictor expects a preprocessed (C, x, y, z) tensor and a "
                             f"3D NMSW network; got input {shape} and a network with {network.ndim} spatial axes")
        logits = super().predict_sliding_window_return_logits(input_image)
        CALLS["nmsw"] += 1
        step = "" if abs(self.tile_step_size - network.step_size) < 1e-9 else (
            f"; -step_size {self.tile_step_size} does not apply (the candidate-patch grid step "
            f"{network.step_size} is part of the network)")
        print(f"{LOG_PREFIX} volume {tuple(input_image.shape[1:])}: global pass + top-K={self._k(network)} local "
              f"patches (patch {network.patch_size}, {self._nmsw_passes} mirror pass(es), Gumbel noise "
              f"{'on' if self.nmsw_test_noise else 'off'}), no sliding window{step}", flush=True)
        return logits

    def _internal_get_sliding_window_slicers(self, image_size):
        if self.nmsw_network() is None:
            return super()._internal_get_sliding_window_slicers(image_size)
        return [(slice(None), *(slice(0, int(s)) for s in image_size))]  # one tile: the whole (padded) volume

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        network = self.nmsw_network()
        if network is None:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        (whole,) = slicers
        results_device = self.device if do_on_device else torch.device("cpu")
        predict = _WholeVolume(network, self._k(network), results_device)
        # Region-based label sets (sigmoid outputs) have no background channel to mask cells with.
        mask_background = network.mask_background and not (self.label_manager is not None
                                                          and self.label_manager.has_regions)
        saved = self.network, self.use_mirroring, network.topk.noise_at_eval, network.mask_background
        try:
            empty_cache(self.device)
            # nnU-Net's mirroring loop calls self.network: for this call it is NMSW on the whole volume
            self.network, self.use_mirroring = predict, self.use_mirroring and self.nmsw_mirroring
            network.topk.noise_at_eval, network.mask_background = self.nmsw_test_noise, mask_background
            logits = self._internal_maybe_mirror_and_predict(data[whole][None].to(self.device))[0]
        finally:
            self.network, self.use_mirroring, network.topk.noise_at_eval, network.mask_background = saved
        self._nmsw_passes = predict.calls
        return logits.to(results_device, torch.half)  # nnU-Net's sliding window returns fp16 logits

    def _k(self, network: NMSWNet) -> int:
        return network.k_infer if self.nmsw_k is None else self.nmsw_k


def _names_nmsw_trainer(name: str) -> bool:
    """``is_nmsw_trainer_name``, after nnU-Net's trainer search has imported (and so registered) ``name``."""
    if is_nmsw_trainer_name(name):
        return True
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the search prints every folder it looks in
            recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError, ImportError):  # no such trainer: nothing to compare with
        return False
    return is_nmsw_trainer_name(name)


# ----------------------------------------------------------------------------- hooks
_NMSW_CLASSES: dict = {}  # predictor class -> the NMSWPredictor subclass that an adopted instance gets


def _nmsw_class_for(cls: type) -> type:
    if issubclass(cls, NMSWPredictor):
        return cls
    if cls is nnUNetPredictor:
        return NMSWPredictor
    if cls not in _NMSW_CLASSES:  # a user's nnUNetPredictor subclass keeps its own methods below NMSW's
        _NMSW_CLASSES[cls] = type(f"NMSW{cls.__name__}", (NMSWPredictor, cls), {})
    return _NMSW_CLASSES[cls]


def _adopt(predictor: nnUNetPredictor, options: dict) -> None:
    options = _checked_options(**options)
    original = type(predictor)
    predictor.__class__ = _nmsw_class_for(original)
    predictor.__dict__.update(options, _nmsw_adopted_from=original)


def _drop_adoption(predictor: NMSWPredictor) -> None:
    """An adopted predictor initialised with a network that is not NMSW becomes what it was."""
    original = predictor.__dict__.pop("_nmsw_adopted_from", None)
    if original is not None:
        for name in (*_OPTION_DEFAULTS, "_nmsw_passes"):
            predictor.__dict__.pop(name, None)
        predictor.__class__ = original


def _checkpoint_path(folder: str, use_folds, checkpoint_name: str) -> str:
    fold = use_folds if isinstance(use_folds, (str, int)) else list(use_folds)[0]
    return os.path.join(folder, f"fold_{fold}", checkpoint_name)


def adopt_loading_predictor(network: NMSWNet, trainer_name: str) -> None:
    """Called by the NMSW trainers' ``build_network_architecture``: if nnU-Net's predictor is loading a
    checkpoint (``initialize_from_trained_model_folder``), check that its weights fit ``network`` and make
    that predictor an :class:`NMSWPredictor` (options from the environment unless it already is one).
    Any other caller (training, tests, untrained benchmark models) changes nothing."""
    names = loading_locals()
    if names is None:
        return
    options = options_from_env()  # parsed before anything changes: a bad value leaves the predictor as it was
    parameters = names.get("parameters")
    if parameters:
        trainer = names.get("trainer_name", trainer_name)
        try:
            network.load_state_dict(parameters[0])  # what nnU-Net does next, with a message that says why
        except RuntimeError as error:
            path = _checkpoint_path(names.get("model_training_output_dir", "?"), names.get("use_folds") or [0],
                                    names.get("checkpoint_name", "checkpoint_final.pth"))
            raise ValueError(
                f"checkpoint {path} was written by trainer {trainer!r} (an NMSW-Net trainer) but its weights do not "
                f"fit the NMSW-Net network that trainer builds (global_net/local_net/objectness_head/aggregation). "
                f"It was probably copied from another trainer's results folder; predict it with the trainer that "
                f"trained it (-tr <that trainer>) or retrain with -tr {trainer}.") from error
    predictor = names["self"]
    if not isinstance(predictor, NMSWPredictor):  # an NMSWPredictor keeps the options it was given
        _adopt(predictor, options)


@contextlib.contextmanager
def validation_predictors(module):
    """Within the block, ``module.nnUNetPredictor(...)`` makes an :class:`NMSWPredictor` with the options of
    the environment (parsed once, here); the name is restored on exit, also after an exception. For
    ``nnUNetTrainer.perform_actual_validation``, which constructs its predictor by that name."""
    options = options_from_env()
    original = module.nnUNetPredictor

    def make_predictor(*args, **kwargs):
        return NMSWPredictor(*args, **options, **kwargs)

    module.nnUNetPredictor = make_predictor
    try:
        yield
    finally:
        module.nnUNetPredictor = original


@contextlib.contextmanager
def nmsw_prediction(predictor: nnUNetPredictor, **options):
    """``predictor`` predicts as an :class:`NMSWPredictor` with ``options`` (``nmsw_k`` ...; unnamed ones keep
    its current values, else the defaults) for the block; afterwards its class and options are what they were,
    also after an exception."""
    unknown = set(options) - set(_OPTION_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown NMSW option(s) {sorted(unknown)}; known: {sorted(_OPTION_DEFAULTS)}")
    saved_class = type(predictor)
    saved = {name: predictor.__dict__[name] for name in (*_OPTION_DEFAULTS, "_nmsw_adopted_from")
             if name in predictor.__dict__}
    current = {name: getattr(predictor, name, default) for name, default in _OPTION_DEFAULTS.items()}
    merged = _checked_options(**{**current, **options})
    predictor.__class__ = _nmsw_class_for(saved_class)
    predictor.__dict__.update(merged)
    try:
        yield predictor
    finally:
        predictor.__class__ = saved_class
        for name in (*_OPTION_DEFAULTS, "_nmsw_adopted_from", "_nmsw_passes"):
            predictor.__dict__.pop(name, None)
        predictor.__dict__.update(saved)
