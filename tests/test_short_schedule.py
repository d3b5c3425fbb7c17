import pickle

import pytest

from nnunet_moe.training import short_schedule
from nnunet_moe.trainer_names import format_lr, parse_lr, parse_short_name
from nnunet_moe.training.short_schedule import short_schedule_trainer


@pytest.mark.parametrize("name,expected", [
    ("nnUNetTrainer_5epochs", ("nnUNetTrainer", 5, None, None, None)),
    ("nnUNetTrainer_1epoch", ("nnUNetTrainer", 1, None, None, None)),
    ("nnUNetTrainerSwinSMT_2epochs_10iters", ("nnUNetTrainerSwinSMT", 2, 10, None, None)),
    ("nnUNetTrainer_5epochs_3epochs_7iters", ("nnUNetTrainer_5epochs", 3, 7, None, None)),
    ("nnUNetTrainerSwinUMambaDScratch_2epochs_4iters_bs2", ("nnUNetTrainerSwinUMambaDScratch", 2, 4, 2, None)),
    ("nnUNetTrainer_3epochs_bs4", ("nnUNetTrainer", 3, None, 4, None)),
    ("nnUNetTrainerSwinSMTSmall_3epochs_30iters_lr1en3", ("nnUNetTrainerSwinSMTSmall", 3, 30, None, 1e-3)),
    ("nnUNetTrainer_2epochs_4iters_bs2_lr2p5en4", ("nnUNetTrainer", 2, 4, 2, 2.5e-4)),
    ("nnUNetTrainer_1epochs_lr1", ("nnUNetTrainer", 1, None, None, 1.0)),
    ("nnUNetTrainer", None),
    ("nnUNetTrainer_epochs", None),
    ("nnUNetTrainer_bs2", None),
    ("nnUNetTrainer_lr1en3", None),  # the learning rate goes with a schedule suffix, like _bs
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


@pytest.mark.parametrize("text,value", [("1en3", 1e-3), ("3en4", 3e-4), ("2p5en4", 2.5e-4), ("1", 1.0),
                                        ("5en1", 0.5), ("12en5", 1.2e-4)])
def test_lr_spelling_round_trips(text, value):
    assert parse_lr(text) == value
    assert parse_lr(format_lr(value)) == value
    assert f"lr{format_lr(value)}".isidentifier()  # nnU-Net looks the class up by name


@pytest.mark.parametrize("text,problem", [("0", "out of range"), ("0en3", "out of range"), ("2", "out of range"),
                                          ("1p5", "out of range"), ("1e-3", "malformed"), ("0.001", "malformed"),
                                          ("abc", "malformed"), ("", "malformed"), ("1en", "malformed")])
def test_bad_learning_rate_is_a_clear_error_naming_value_and_rule(text, problem):
    name = f"nnUNetTrainer_2epochs_lr{text}"
    with pytest.raises(ValueError) as err:
        parse_short_name(name)
    message = str(err.value)
    assert problem in message and repr(text) in message and name in message and "(0, 1]" in message
    with pytest.raises(ValueError, match=problem):  # the class lookup nnU-Net does fails the same way
        getattr(short_schedule, name)


def _optimizer_lr(trainer):
    from trainer_fixtures import network_for

    trainer.network = network_for(trainer)
    optimizer, scheduler = trainer.configure_optimizers()
    scheduler.step(0)  # what nnU-Net's on_train_epoch_start does before the first epoch
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("base,config,default_lr", [("nnUNetTrainerSwinSMTSmall", "3d_fullres", 1e-4),
                                                    ("nnUNetTrainer", "2d", 1e-2)])
def test_lr_suffix_sets_the_optimizers_learning_rate(base, config, default_lr, tmp_path, monkeypatch):
    """Ours read ``initial_lr`` as a class attribute, nnU-Net's set it in ``__init__``: both start at 3e-4."""
    from trainer_fixtures import make_trainer

    plain = make_trainer(getattr(short_schedule, f"{base}_3epochs"), config, tmp_path, monkeypatch)
    assert _optimizer_lr(plain) == pytest.approx(default_lr)
    trainer = make_trainer(getattr(short_schedule, f"{base}_3epochs_lr3en4"), config, tmp_path, monkeypatch)
    assert trainer.initial_lr == 3e-4
    assert _optimizer_lr(trainer) == pytest.approx(3e-4)
    # results go to a folder named after the full trainer name
    assert f"{base}_3epochs_lr3en4__nnUNetPlans__{config}" in trainer.output_folder


def test_lr_class_pickles_and_is_recreated_by_name():
    cls = short_schedule.nnUNetTrainer_2epochs_5iters_lr1en3
    assert cls.__name__ == cls.__qualname__ == "nnUNetTrainer_2epochs_5iters_lr1en3"
    data = pickle.dumps(cls)
    short_schedule._CACHE.pop(cls.__name__)  # as in a fresh process: the class must come back from its name
    again = pickle.loads(data)
    assert again.__name__ == cls.__name__ and again is short_schedule._CACHE[cls.__name__]
    # a spelling other than format_lr's is kept as written (its folder is the name the user gave)
    assert short_schedule.nnUNetTrainer_2epochs_lr10en4.__name__ == "nnUNetTrainer_2epochs_lr10en4"
