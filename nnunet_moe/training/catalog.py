"""The list of our trainers: name -> (module, paper, configurations).

One place that ``nnunet-moe list``, the nnU-Net trainer folder and the short-schedule
factory all read, so adding a trainer is one line here plus the class itself.
Modules are imported lazily: listing names needs no torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainerInfo:
    name: str
    module: str
    paper: str
    configurations: tuple

    def load(self):
        return getattr(importlib.import_module(self.module), self.name)


TRAINERS: tuple = (
)


def trainer_names() -> list:
    return [t.name for t in TRAINERS]


def our_trainer_class(name: str):
    """Our trainer class called ``name``, or None if it is not one of ours."""
    for info in TRAINERS:
        if info.name == name:
            return info.load()
    return None
