"""Re-exports every nnunet-moe trainer for nnU-Net's trainer search (``nnUNet_extTrainer``).

Short schedules (``<Trainer>_<E>epochs[_<I>iters][_bs<B>][_lr<X>]``) are created on demand by
``nnunet_moe.training.short_schedule``. An unknown ``nnUNetTrainer*`` name raises a RuntimeError listing
our trainer names (nnU-Net's search only skips AttributeError, so ours is the error the user sees) when
this folder is the last one nnU-Net searches; otherwise the folders after it are still searched.
Resolving one of our trainers while nnU-Net's predictor loads a checkpoint makes that predictor check
its input files first (:mod:`nnunet_moe.inference.input_checks`).
"""
import os

from nnunet_moe.training import catalog as _catalog
from nnunet_moe.training import short_schedule as _short


def _searched_last() -> bool:
    """True when no folder after this one is listed in ``nnUNet_extTrainer`` (the start-up hook appends it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    entries = [os.path.abspath(p) for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    return here not in entries or entries.index(here) == len(entries) - 1


def _ours(cls):
    from nnunet_moe.inference.input_checks import adopt_loading_predictor

    adopt_loading_predictor()  # nnUNetv2_predict: the loading predictor checks its input for our models
    return cls


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    cls = _catalog.our_trainer_class(name)
    if cls is not None:
        return _ours(cls)
    try:
        return _ours(getattr(_short, name))
    except AttributeError:
        pass
    if name.startswith("nnUNetTrainer") and _searched_last():
        raise RuntimeError(
            f"nnunet-moe: no trainer named {name!r}. nnunet-moe trainers: "
            f"{', '.join(_catalog.trainer_names()) or '(none)'}; short schedules: "
            f"<Trainer>_<E>epochs[_<I>iters][_bs<B>][_lr<X>], e.g. nnUNetTrainer_2epochs_10iters. "
            f"See `nnunet-moe list`."
        )
    raise AttributeError(name)
