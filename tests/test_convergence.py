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


def test_measured_rows_are_reused_and_new_rows_added(tmp_path, monkeypatch):
    """``--measured``: a run recorded in the row file is not trained again; a new one is trained once and
    added to the file; ``--report-only`` redraws the table from the file alone."""
    from types import SimpleNamespace

    runs = (("2d", "nnUNetTrainerAdam1en3", 8, (None,)), ("2d", "nnUNetTrainerM4oESmall", 8, (None,)))
    first, second = [name for _, name in convergence.run_names(runs)]
    row = {"fold0_dice": 0.5, "heldout_dice": 0.6, "seconds_per_iteration": 1.0, "max_lr": 1e-3,
           "pseudo_dice_per_epoch": [0.2, 0.4], "iterations_per_epoch": 30, "peak_rss_mib": 100.0}
    store = tmp_path / "measured.json"
    json.dump([dict(row, configuration="2d", trainer=first, repeat=0)], open(store, "w"))
    trained = []
    monkeypatch.setattr(convergence, "run_names", lambda: [("2d", first), ("2d", second)])
    monkeypatch.setattr(convergence, "write_demo_dataset", lambda *a: SimpleNamespace(dataset_id=1, name="D"))
    monkeypatch.setattr(convergence, "ensure_plans", lambda *a, **k: None)
    monkeypatch.setattr(convergence, "run_one", lambda ds, c, t, *a: trained.append(t) or dict(row, configuration=c,
                                                                                                  trainer=t))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    assert convergence.main(["--out", str(tmp_path / "w"), "--measured", str(store)]) == 0
    assert trained == [second]
    kept = json.load(open(store))
    assert [r["trainer"] for r in kept] == [first, second] and kept[1]["machine"]["cpus"] == os.cpu_count()
    assert convergence.main(["--out", str(tmp_path / "w"), "--measured", str(store)]) == 0
    assert trained == [second]  # both recorded now: nothing trained again
    assert convergence.main(["--out", str(tmp_path / "r"), "--measured", str(store), "--report-only"]) == 0
    assert f"`{second}`" in open(tmp_path / "r" / "convergence.md").read()


def test_measured_file_of_another_kind_is_refused(tmp_path):
    bad = tmp_path / "rows.json"
    json.dump({"not": "rows"}, open(bad, "w"))
    with pytest.raises(SystemExit, match="not a convergence row file"):
        convergence.read_measured(str(bad))


def test_plans_are_reused_only_when_every_case_was_preprocessed(tmp_path, monkeypatch):
    """A preprocessing killed half-way is run again (nnU-Net would split and train on the cases it finished)."""
    from nnunet_moe import stock_pipeline

    calls = []
    monkeypatch.setattr(stock_pipeline, "run_streamed", lambda cmd, env=None, log=print: calls.append(cmd))
    monkeypatch.setattr(stock_pipeline, "nnunet_command", lambda name: name)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    pre = tmp_path / "Dataset501_X"
    (pre / "nnUNetPlans_2d").mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text("{}")
    json.dump({"numTraining": 3}, open(pre / "dataset.json", "w"))
    for case in ("a", "b"):
        (pre / "nnUNetPlans_2d" / f"{case}.pkl").write_text("")
    stock_pipeline.ensure_plans(501, "Dataset501_X", "2d", log=lambda *a: None)
    assert len(calls) == 1 and calls[0][0] == "nnUNetv2_plan_and_preprocess"  # 2 of 3 cases: planned again
    (pre / "nnUNetPlans_2d" / "c.pkl").write_text("")
    stock_pipeline.ensure_plans(501, "Dataset501_X", "2d", log=lambda *a: None)
    assert len(calls) == 1  # complete: reused


def test_shipped_rows_are_runs_of_this_benchmark():
    """Every row behind the README's table is one of the runs this command would train, so the
    command reproduces the table (a row for a run dropped from ``DEFAULT_RUNS`` fails here)."""
    shipped = os.path.join(os.path.dirname(convergence.__file__), "measured", "hippocampus_convergence.json")
    names = set(convergence.run_names())
    rows = convergence.read_measured(shipped).values()
    assert rows and {(r["configuration"], r["trainer"]) for r in rows} <= names
