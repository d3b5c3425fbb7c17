"""Short schedules for any trainer, by name: ``<Trainer>_<E>epochs[_<I>iters][_bs<B>][_lr<X>]``.

nnU-Net's default (1000 epochs x 250 iterations) is out of reach on a CPU. nnU-Net itself
ships fixed classes such as ``nnUNetTrainer_5epochs``; here the same idea is generalised
so that no code is needed per trainer. Asking nnU-Net for

    nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerSwinSMT_5epochs_20iters

creates (on first attribute access of this module) a subclass of ``nnUNetTrainerSwinSMT``
that trains 5 epochs of 20 iterations with ``max(1, 20 // 5)`` validation iterations per
epoch, saving ``checkpoint_latest.pth`` after every epoch (so an interrupted short run
resumes with ``--c``). ``_<I>iters`` is optional (then nnU-Net's 250/50 iterations stay).
``_bs<B>`` (optional) trains with batch size ``B`` instead of the plans' (nnU-Net plans large
2D batches, e.g. 59 slices for hippocampus, that are slow on a CPU); without it the plans'
batch size is used. With DDP the plans' batch size is kept. ``_lr<X>`` (optional) sets the initial
learning rate, spelled as a Python identifier (``lr1en3`` = 1e-3, ``lr2p5en4`` = 2.5e-4; the grammar
is in :mod:`nnunet_moe.trainer_names`); the base's optimiser and schedule then start from it. The base may be
any of our trainers or any trainer shipped with nnU-Net (``nnUNetTrainer_3epochs_10iters``).
Everything else - optimiser, learning-rate schedule shape (it decays over the shorter run),
augmentation, loss - is the base trainer's.

The classes live in this module (``__module__``/``__qualname__`` point here and the
module-level ``__getattr__`` recreates them on demand), so they pickle, survive
``mp.spawn`` and are found again when a checkpoint is loaded in a new process. Results
go to their own folder (nnU-Net names it after the trainer), so a short run never mixes
with a full one.
"""
from __future__ import annotations

import torch

from nnunet_moe.trainer_names import format_lr, parse_lr, parse_short_name

_CACHE: dict = {}


def resolve_base_trainer(name: str):
    """A trainer class by name: ours first, then nnU-Net's own trainers (never the external folders)."""
    from nnunet_moe.training.catalog import our_trainer_class

    cls = our_trainer_class(name)
    if cls is not None:
        return cls
    from os.path import join

    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    return recursive_find_python_class(
        join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), name, "nnunetv2.training.nnUNetTrainer"
    )


def short_schedule_trainer(base, epochs: int, iters: int | None = None, batch_size: int | None = None,
                           lr: float | str | None = None):
    """Subclass of ``base`` with ``epochs`` epochs of ``iters`` iterations (``None``: base's), batch size
    ``batch_size`` (``None``: the plans') and initial learning rate ``lr`` (``None``: base's; a float, or
    its name spelling such as ``'1en3'``, which is then kept in the class name as written)."""
    lr_text = None if lr is None else (lr if isinstance(lr, str) else format_lr(lr))
    lr_value = None if lr_text is None else parse_lr(lr_text)
    name = (f"{base.__name__}_{epochs}epochs" + (f"_{iters}iters" if iters is not None else "")
            + (f"_bs{batch_size}" if batch_size is not None else "") + (f"_lr{lr_text}" if lr_text else ""))
    if name in _CACHE:
        return _CACHE[name]

    # nnU-Net records the constructor's arguments by name (for checkpoints), so the
    # signature must be exactly nnU-Net's.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        self.save_every = 1  # epochs are few and slow on CPU: keep checkpoint_latest current for --c
        if iters is not None:
            self.num_iterations_per_epoch = iters
            self.num_val_iterations_per_epoch = max(1, iters // 5)
        if lr_value is not None:
            # after base.__init__: nnU-Net's trainers assign self.initial_lr there, ours read a class
            # attribute (base.py deletes the instance copy); an instance value set now wins for both
            self.initial_lr = lr_value

    def _set_batch_size_and_oversample(self):
        base._set_batch_size_and_oversample(self)
        if batch_size is not None and not self.is_ddp:
            self.batch_size = batch_size

    doc = (f"{base.__name__} with a short schedule: {epochs} epochs" + (f" of {iters} iterations" if iters else "")
           + (f", batch size {batch_size}" if batch_size else "")
           + (f", initial learning rate {lr_value:g}." if lr_value is not None else "."))
    cls = type(name, (base,), {"__init__": __init__, "_set_batch_size_and_oversample": _set_batch_size_and_oversample,
                               "__module__": __name__, "__qualname__": name, "__doc__": doc})
    _CACHE[name] = cls
    return cls


def __getattr__(name: str):
    parsed = parse_short_name(name) if not name.startswith("__") else None
    if parsed is None:
        raise AttributeError(name)
    base = resolve_base_trainer(parsed.base)
    if base is None:
        raise AttributeError(name)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if not issubclass(base, nnUNetTrainer):
        raise AttributeError(name)
    lr_text = name.rsplit("_lr", 1)[1] if parsed.lr is not None else None  # the spelling as written
    return short_schedule_trainer(base, parsed.epochs, parsed.iters, parsed.batch_size, lr_text)
