"""Re-exports every nnunet-moe trainer for nnU-Net's trainer search (``nnUNet_extTrainer``).

Short schedules (``<Trainer>_<E>epochs[_<I>iters][_bs<B>][_lr<X>]``) are created on demand by
``nnunet_moe.training.short_schedule``; an unknown ``nnUNetTrainer*`` name prints our
trainer names so the user sees what exists.
"""
import sys

from nnunet_moe.training import catalog as _catalog
from nnunet_moe.training import short_schedule as _short


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    cls = _catalog.our_trainer_class(name)
    if cls is not None:
        return cls
    try:
        return getattr(_short, name)
    except AttributeError:
        pass
    if name.startswith("nnUNetTrainer"):
        sys.stderr.write(
            f"nnunet-moe: no trainer named {name!r}. nnunet-moe trainers: "
            f"{', '.join(_catalog.trainer_names()) or '(none)'}; short schedules: "
            f"<Trainer>_<E>epochs[_<I>iters][_bs<B>][_lr<X>], e.g. nnUNetTrainer_2epochs_10iters. See `nnunet-moe list`.\n"
        )
    raise AttributeError(name)
