import pytest

from nnunet_moe.training import short_schedule
from nnunet_moe.trainer_names import parse_short_name
from nnunet_moe.training.short_schedule import short_schedule_trainer


@pytest.mark.parametrize("name,expected", [
    ("nnUNetTrainer_5epochs", ("nnUNetTrainer", 5, None, None)),
    ("nnUNetTrainer_1epoch", ("nnUNetTrainer", 1, None, None)),
    ("nnUNetTrainerSwinSMT_2epochs_10iters", ("nnUNetTrainerSwinSMT", 2, 10, None)),
    ("nnUNetTrainer_5epochs_3epochs_7iters", ("nnUNetTrainer_5epochs", 3, 7, None)),
    ("nnUNetTrainerSwinUMambaDScratch_2epochs_4iters_bs2", ("nnUNetTrainerSwinUMambaDScratch", 2, 4, 2)),
    ("nnUNetTrainer_3epochs_bs4", ("nnUNetTrainer", 3, None, 4)),
    ("nnUNetTrainer", None),
    ("nnUNetTrainer_epochs", None),
    ("nnUNetTrainer_bs2", None),
])
def test_parse(name, expected):
    assert parse_short_name(name) == expected


def test_zero_epochs_is_a_clear_error():
    with pytest.raises(ValueError, match="must be >= 1"):
        parse_short_name("nnUNetTrainer_0epochs")
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        parse_short_name("nnUNetTrainer_2epochs_bs0")


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


def test_batch_size_suffix_overrides_the_plans_batch_size(tmp_path, monkeypatch):
    """``_bs2`` replaces the plans' batch size (59 slices for hippocampus 2d) after nnU-Net sets it."""
    from trainer_fixtures import make_trainer

    trainer = make_trainer(short_schedule.nnUNetTrainer_2epochs_4iters_bs2, "2d", tmp_path, monkeypatch)
    assert trainer.configuration_manager.batch_size > 2  # the plans' value is untouched ...
    trainer._set_batch_size_and_oversample()
    assert trainer.batch_size == 2  # ... but the trainer uses ours
    plain = make_trainer(short_schedule.nnUNetTrainer_2epochs_4iters, "2d", tmp_path, monkeypatch)
    plain._set_batch_size_and_oversample()
    assert plain.batch_size == plain.configuration_manager.batch_size
