"""What every nnunet-moe trainer shares, as one nnU-Net trainer subclass.

Subclasses set class attributes and implement ``build_network_architecture``; everything
else (data, augmentation, loss, checkpoints, validation, prediction) is nnU-Net's.

- ``paper`` / ``supported_configurations``: shown by ``nnunet-moe list``; another
  configuration is refused with a clear error before anything is written.
- ``network_class``: our network. Its classmethods ``input_divisor()`` (the plans' patch size
  is replaced by :func:`nnunet_moe.training.patch_size.valid_patch_size`, saved with the model
  so prediction uses it too) and ``deep_supervision_factors()`` (downsampling factor of each
  output, highest resolution first; the loss and the target downsampling are built from it
  instead of from the plans' CNN pooling) drive the plans. None: nnU-Net's rules apply.
- ``enable_deep_supervision``: nnU-Net's switch, here a class attribute like the others.
- Optimiser: ``optimizer_class`` (AdamW; :class:`~nnunet_moe.training.freezing.FreezableAdamW` where
  parameters are frozen for a while) with ``initial_lr``, ``weight_decay``, ``adam_eps``, linear warm-up over
  ``warmup_fraction`` of the epochs and cosine decay, stepped per epoch. nnU-Net's gradient
  clipping (norm 12) is kept.
- ``weights_env`` / ``pretrained``: a pretrained trainer reads its checkpoint path from this
  environment variable; ``pretrained_weights_path()`` returns it (None when resuming: the weights
  come from nnU-Net's checkpoint) or stops with one message naming the variable, what the file is
  (``weights_description``, ``weights_hint``) and the ``...Scratch`` alternative (``scratch_phrase``).
- ``load_weights_from_env``: loads the file of a weights variable with one of our loaders; errors name the
  variable and the file; ``log_load_report`` writes the one log entry, whichever loader read them.

Deep supervision follows nnU-Net's convention: the network's ``decoder.deep_supervision``
selects the list output, which nnU-Net's own ``set_deep_supervision_enabled`` sets.
``build_network_architecture`` is a classmethod (nnU-Net calls it on the class with the
same arguments as its static method), so variants can change class attributes only.
"""
from __future__ import annotations

import copy
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_moe.networks.unwrap import unwrap_network
from nnunet_moe.training.lr_schedules import WarmupCosineLRScheduler
from nnunet_moe.training.patch_size import valid_patch_size


class nnUNetMoETrainerBase(nnUNetTrainer):
    paper: str = ""
    supported_configurations: tuple = ("3d_fullres",)
    network_class: type | None = None
    enable_deep_supervision: bool = True
    initial_lr: float = 1e-4
    weight_decay: float = 1e-5
    adam_eps: float = 1e-8
    warmup_fraction: float = 0.1
    optimizer_class: type = torch.optim.AdamW
    pretrained: bool = False
    weights_env: str | None = None
    weights_description: str = ""  # "the ImageNet-pretrained VMamba-Tiny encoder"
    weights_hint: str = ""  # what to put after "<weights_env>="
    scratch_phrase: str = "from scratch"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if configuration not in self.supported_configurations:
            raise ValueError(
                f"{type(self).__name__} supports the configurations {', '.join(self.supported_configurations)}, "
                f"not {configuration!r}. Run e.g. nnUNetv2_train DATASET {self.supported_configurations[0]} FOLD "
                f"-tr {type(self).__name__}.")
        plans, patch_note = self.prepare_plans(plans, configuration)
        # nnU-Net pops this flag; keep it: a resumed run takes its weights from the checkpoint.
        self._resuming = bool(plans.get("continue_training", False))
        super().__init__(plans, configuration, fold, dataset_json, device)
        # nnU-Net's __init__ gives the instance its own values of these, which would hide our class attributes.
        del self.initial_lr, self.weight_decay, self.enable_deep_supervision
        if patch_note:
            self.print_to_log_file(patch_note, also_print_to_console=True)

    @classmethod
    def prepare_plans(cls, plans: dict, configuration: str):
        """A copy of ``plans`` with this architecture's valid patch size; and a note saying what changed."""
        if cls.network_class is None:
            return plans, ""
        divisor = cls.network_class.input_divisor()
        plans = copy.deepcopy(plans)
        resolved = PlansManager(plans).get_configuration(configuration).patch_size
        try:
            valid = valid_patch_size(resolved, divisor)
        except ValueError as error:
            raise ValueError(
                f"{cls.__name__}: the {configuration} patch size {list(resolved)} of plans "
                f"{plans.get('plans_name', '?')!r} cannot be made valid for this architecture ({error}; each axis is "
                f"rounded to the nearest multiple of {divisor}). Fix patch_size in that plans file "
                f"($nnUNet_preprocessed/{plans.get('dataset_name', 'DatasetXXX')}/{plans.get('plans_name', '?')}.json) "
                f"or plan again with nnUNetv2_plan_and_preprocess.") from None
        plans["configurations"][configuration]["patch_size"] = valid
        note = "" if list(resolved) == valid else (
            f"{cls.__name__}: patch size {list(resolved)} from the plans -> {valid} (each axis rounded to the "
            f"nearest multiple of {divisor}, which this architecture's downsampling requires).")
        return plans, note

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision or self.network_class is None:
            return super()._get_deep_supervision_scales()
        ndim = len(self.configuration_manager.patch_size)
        return [[1.0 / f] * ndim for f in self.network_class.deep_supervision_factors()]

    def pretrained_weights_path(self) -> str | None:
        """The checkpoint to load into a new network: ``$weights_env``; None if not pretrained or resuming."""
        if not self.pretrained or self._resuming:
            return None
        path = os.environ.get(self.weights_env or "")
        if not path:
            name = type(self).__name__
            raise RuntimeError(f"{name} starts from {self.weights_description}. Set {self.weights_env}="
                               f"{self.weights_hint}, or train {self.scratch_phrase} with -tr {name}Scratch.")
        return path

    def load_weights_from_env(self, env: str, path: str, loader):
        """``loader(network, path)`` (a pretrained loader returning a
        :class:`~nnunet_moe.pretrained.load_report.LoadReport`) for the file the user gave with ``env``; a
        file that cannot be used stops with the loader's reason (which says what to do) prefixed by ``env=path``."""
        try:
            report = loader(unwrap_network(self.network), path)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"{env}={path}: {error}") from None
        self.log_load_report(env, report)
        return report

    def log_load_report(self, env: str, report) -> None:
        """The log entry of a pretrained-weight load (a :class:`~nnunet_moe.pretrained.load_report.LoadReport`)
        requested through the environment variable ``env``."""
        self.print_to_log_file(f"{env}={report.checkpoint}\n{report.summary(max_names=None)}",
                               also_print_to_console=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_class(self.network.parameters(), lr=self.initial_lr,
                                         weight_decay=self.weight_decay, eps=self.adam_eps)
        warmup = int(self.warmup_fraction * self.num_epochs)
        scheduler = WarmupCosineLRScheduler(optimizer, self.initial_lr, self.num_epochs, warmup)
        return optimizer, scheduler
