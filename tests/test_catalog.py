"""The trainer catalogue names classes only; ``nnunet-moe list`` prints what the classes say."""
from __future__ import annotations

import re

import pytest
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_moe import cli
from nnunet_moe.training import catalog
from nnunet_moe.training.base import nnUNetMoETrainerBase


def listed_rows(capsys) -> dict:
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["trainer", "configurations", "paper"]
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            break
        name, configurations, paper = re.split(r"\s{2,}", line, maxsplit=2)
        rows[name] = (configurations, paper)
    return rows


def test_every_listed_trainer_loads_and_is_an_nnunet_trainer():
    assert catalog.trainer_names()
    for name in catalog.trainer_names():
        cls = catalog.our_trainer_class(name)
        assert isinstance(cls, type) and issubclass(cls, nnUNetTrainer) and issubclass(cls, nnUNetMoETrainerBase)
        assert cls.__name__ == name and cls.paper and cls.supported_configurations
    assert catalog.our_trainer_class("nnUNetTrainer") is None  # nnU-Net's own: not in our catalogue


def test_list_prints_what_the_classes_say(capsys, monkeypatch):
    rows = listed_rows(capsys)
    assert list(rows) == catalog.trainer_names()
    for cls in catalog.trainer_classes():
        assert rows[cls.__name__] == (", ".join(cls.supported_configurations), cls.paper)

    # the printed values come from the classes: changing one changes the output
    nmsw = catalog.our_trainer_class("nnUNetTrainerNMSW")
    monkeypatch.setattr(nmsw, "paper", "a paper set by the test")
    monkeypatch.setattr(nmsw, "supported_configurations", ("3d_fullres", "3d_lowres"))
    assert listed_rows(capsys)["nnUNetTrainerNMSW"] == ("3d_fullres, 3d_lowres", "a paper set by the test")


@pytest.mark.parametrize("name", ["nnUNetTrainerSwinSMT", "nnUNetTrainerSwinUMamba", "nnUNetTrainerSwinUMambaD"])
def test_trainers_take_patch_divisor_and_output_scales_from_their_network(name):
    cls = catalog.our_trainer_class(name)
    assert cls.network_class is not None
    for attribute in ("input_divisor", "deep_supervision_factors"):
        assert attribute not in vars(cls)  # the trainer does not restate its network's facts
    assert cls.network_class.input_divisor() == 32


def test_nnunets_own_deep_supervision_switch_is_used():
    # every network of ours carries decoder.deep_supervision, which nnU-Net's method sets
    assert "set_deep_supervision_enabled" not in vars(nnUNetMoETrainerBase)
