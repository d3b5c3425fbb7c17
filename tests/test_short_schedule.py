import pytest
import torch

from nnunet_moe.training import short_schedule
from nnunet_moe.training.short_schedule import parse_short_name, short_schedule_trainer


@pytest.mark.parametrize("name,expected", [
    ("nnUNetTrainer_5epochs", ("nnUNetTrainer", 5, None)),
    ("nnUNetTrainer_1epoch", ("nnUNetTrainer", 1, None)),
    ("nnUNetTrainerSwinSMT_2epochs_10iters", ("nnUNetTrainerSwinSMT", 2, 10)),
    ("nnUNetTrainer_5epochs_3epochs_7iters", ("nnUNetTrainer_5epochs", 3, 7)),
    ("nnUNetTrainer", None),
    ("nnUNetTrainer_epochs", None),
])
def test_parse(name, expected):
    assert parse_short_name(name) == expected


def test_zero_epochs_is_a_clear_error():
    with pytest.raises(ValueError, match="must be >= 1"):
        parse_short_name("nnUNetTrainer_0epochs")


def test_class_sets_schedule_and_keeps_nnunet_signature(tmp_path, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    import inspect

    cls = short_schedule.nnUNetTrainer_3epochs_20iters
    assert cls is short_schedule_trainer(nnUNetTrainer, 3, 20)  # cached: one class per name
    assert issubclass(cls, nnUNetTrainer)
    assert list(inspect.signature(cls.__init__).parameters) == list(
        inspect.signature(nnUNetTrainer.__init__).parameters)


def test_unknown_base_is_attribute_error():
    with pytest.raises(AttributeError):
        getattr(short_schedule, "NoSuchTrainer_3epochs")
