"""The convergence benchmark's bookkeeping: run names, one row from a finished fold folder, the table."""
from __future__ import annotations

import json
import os

import pytest
import torch

from nnunet_moe.benchmark import convergence
from nnunet_moe.trainer_names import parse_short_name


def test_run_names_follow_the_short_schedule_grammar():
    names = convergence.run_names()
    parsed = {name: parse_short_name(name) for _, name in names}
    assert all(p is not None and p.epochs * p.iters == 300 for p in parsed.values())
    assert ("3d_fullres", "nnUNetTrainerSwinSMTSmall_10epochs_30iters") in names
    assert ("3d_fullres", "nnUNetTrainerSwinSMTSmall_10epochs_30iters_lr1en3") in names
    assert parsed["nnUNetTrainerSwinUMambaScratch_10epochs_30iters_bs8_lr1en3"].batch_size == 8
    assert len(names) == len(set(names))


def _fake_fold(tmp_path, epochs=3, iters=30):
    fold = tmp_path / "fold_0"
    (fold / "validation").mkdir(parents=True)
    starts = [100.0 * e for e in range(epochs)]
    logging = {"epoch_start_timestamps": starts,
               "epoch_end_timestamps": [s + d for s, d in zip(starts, (90.0, 60.0, 66.0))],
               "lrs": [1e-3, 7e-4, 2e-4], "mean_fg_dice": [0.1, 0.4, 0.6]}
    torch.save({"logging": logging, "trainer_name": "x"}, fold / "checkpoint_final.pth")
    json.dump({"foreground_mean": {"Dice": 0.55}}, open(fold / "validation" / "summary.json", "w"))
    return str(fold)


def test_row_from_a_finished_fold(tmp_path):
    fold = _fake_fold(tmp_path)
    heldout = {"foreground_mean": {"Dice": 0.61}, "mean": {"1": {"Dice": 0.6}, "2": {"Dice": 0.62}}}
    row = convergence.summarise_run(fold, "nnUNetTrainerAdam1en3_3epochs_30iters", heldout)
    assert row["fold0_dice"] == 0.55 and row["heldout_dice"] == 0.61
    assert row["seconds_per_iteration"] == pytest.approx(66.0 / 30)  # median epoch / training iterations
    assert row["max_lr"] == 1e-3 and row["pseudo_dice_per_epoch"] == [0.1, 0.4, 0.6]
    row.update(configuration="3d_fullres", trainer="T", repeat=0, peak_rss_mib=1536.4)
    table = convergence.markdown([row])
    assert "| 3d_fullres | `T` | 0.001 | 0 | 0.550 | 0.610 | 2.20 | 1,536 |" in table
    convergence.plot([row], str(tmp_path / "p.png"))
    assert os.path.getsize(tmp_path / "p.png") > 1000


def test_training_steps_use_the_results_folder_of_their_environment(tmp_path, monkeypatch):
    """Each convergence run trains into its own nnUNet_results (given in the command's environment), while
    this process's nnUNet_results stays as it is."""
    from nnunet_moe import stock_pipeline

    calls = []
    monkeypatch.setattr(stock_pipeline, "run_streamed", lambda cmd, env=None, log=print: calls.append((cmd, env)) or 7)
    monkeypatch.setattr(stock_pipeline, "nnunet_command", lambda name: name)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "process"))
    env = stock_pipeline.training_env("cpu", nnUNet_results=str(tmp_path / "run"))
    first = stock_pipeline.train_or_reuse(501, "Dataset501_X", "T", "2d", 0, "cpu", env=env, log=lambda *a: None)
    assert first["output_folder"] == str(tmp_path / "run" / "Dataset501_X" / "T__nnUNetPlans__2d" / "fold_0")
    assert first["ran"] and first["peak_rss_bytes"] == 7 and calls[0][1]["nnUNet_results"] == str(tmp_path / "run")
    os.makedirs(first["output_folder"])
    open(os.path.join(first["output_folder"], "checkpoint_final.pth"), "w").close()
    again = stock_pipeline.train_or_reuse(501, "Dataset501_X", "T", "2d", 0, "cpu", env=env, log=lambda *a: None)
    assert not again["ran"] and len(calls) == 1  # the finished run in the environment's folder is reused
    assert os.environ["nnUNet_results"] == str(tmp_path / "process")
