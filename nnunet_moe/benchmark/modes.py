"""Inference modes of ``nnunet-moe benchmark``: ways of running the same loaded weights.

``sliding_window`` is nnU-Net's default; on an NMSW model it runs the local (full-resolution patch)
network alone, the baseline the NMSW paper compares against on the same weights. ``nmsw`` is NMSW-Net's
top-K patch inference (Jeon et al., ``nnunet_moe.inference.nmsw_predictor``: the predictor is an
``NMSWPredictor`` for the mode's duration, K from ``--nmsw-k``, the other options from the environment).
``auto`` picks ``nmsw`` for an NMSW network and ``sliding_window`` otherwise. A new mode is a subclass
of ``InferenceMode`` added to ``MODES``.
"""
from __future__ import annotations

import contextlib

from nnunet_moe.networks.unwrap import unwrap_network

AUTO_MODE = "auto"


def is_nmsw_network(network) -> bool:
    try:
        from nnunet_moe.networks.nmsw import NMSWNet
    except ImportError:  # a build without the NMSW network cannot have NMSW checkpoints
        return False
    return isinstance(unwrap_network(network), NMSWNet)


class InferenceMode:
    """One way of running a loaded ``nnUNetPredictor`` on preprocessed data.

    ``unavailable_reason`` says why the mode cannot run this predictor's network (None: it can);
    ``active`` is a context manager that prepares the predictor and yields the network whose
    parameters the mode uses, and restores the predictor on exit; ``patch_network`` is the module
    that processes the full-resolution patches (its forward passes are the patches per case).
    """

    name = ""
    description = ""
    cache_flops_by_shape = False  # True when the mode's FLOPs depend only on the preprocessed shape

    def unavailable_reason(self, predictor) -> str | None:
        return None

    @contextlib.contextmanager
    def active(self, predictor, options):
        yield predictor.network

    def patch_network(self, network):
        return network


class SlidingWindowMode(InferenceMode):
    name = "sliding_window"
    description = "nnU-Net's sliding window (Gaussian weighting, mirroring TTA unless --no-tta)"
    cache_flops_by_shape = True

    @contextlib.contextmanager
    def active(self, predictor, options):
        if not is_nmsw_network(predictor.network):
            yield predictor.network
            return
        # Same NMSW weights, stock sliding window over the local network only. The predictor
        # reloads list_of_parameters into predictor.network before every prediction, so both are
        # swapped; a network that is not an NMSWNet is never dispatched to NMSW inference.
        local_net = unwrap_network(predictor.network).local_net
        saved = predictor.network, predictor.list_of_parameters
        predictor.network, predictor.list_of_parameters = local_net, [local_net.state_dict()]
        try:
            yield local_net
        finally:
            predictor.network, predictor.list_of_parameters = saved


class NMSWMode(InferenceMode):
    name = "nmsw"
    description = "NMSW-Net top-K patch inference (no sliding window)"

    def unavailable_reason(self, predictor):
        if not is_nmsw_network(predictor.network):
            return (f"mode 'nmsw' needs an NMSW-Net model (nnunet_moe.networks.nmsw.NMSWNet) but this network is "
                    f"{type(unwrap_network(predictor.network)).__name__}")
        try:
            import nnunet_moe.inference.nmsw_predictor  # noqa: F401
        except ImportError as error:
            return f"mode 'nmsw' needs nnunet_moe.inference.nmsw_predictor, which cannot be imported ({error})"
        return None

    @contextlib.contextmanager
    def active(self, predictor, options):
        from nnunet_moe.inference.nmsw_predictor import nmsw_prediction, options_from_env

        settings = options_from_env()  # the CLI's NNUNET_MOE_NMSW_* variables; --nmsw-k wins over the K one
        if options.nmsw_k is not None:
            settings["nmsw_k"] = options.nmsw_k
        with nmsw_prediction(predictor, **settings):
            yield predictor.network

    def patch_network(self, network):
        return unwrap_network(network).local_net


MODES = {mode.name: mode for mode in (SlidingWindowMode(), NMSWMode())}


def check_modes(requested: list | None) -> list:
    """The requested mode names (default ``auto``); raises ValueError for an unknown one."""
    requested = list(requested or [AUTO_MODE])
    for name in requested:
        if name != AUTO_MODE and name not in MODES:
            raise ValueError(f"unknown inference mode {name!r}; choose from {[AUTO_MODE, *MODES]}")
    return requested


def resolve_modes(network, requested: list) -> list:
    """Mode names (checked by ``check_modes``) to run for ``network``: ``auto`` becomes ``nmsw`` for NMSW networks,
    else ``sliding_window``; duplicates collapse."""
    resolved = []
    for name in requested:
        if name == AUTO_MODE:
            name = NMSWMode.name if is_nmsw_network(network) else SlidingWindowMode.name
        if name not in resolved:
            resolved.append(name)
    return resolved
