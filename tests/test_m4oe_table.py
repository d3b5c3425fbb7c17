"""The M4oE benchmark's bookkeeping: its runs, scores by source from nnU-Net's summary, the table."""
from __future__ import annotations

import json
import os
import re

import pytest

from nnunet_moe.benchmark import m4oe_table
from nnunet_moe.datasets.metadata import MERGE_KEY
from nnunet_moe.datasets.splits import stratified_splits
from nnunet_moe.trainer_names import parse_short_name


def test_every_run_has_the_same_budget():
    rows = m4oe_table.runs()
    names = [t for _, _, t, _ in rows] + [p for *_, p in rows if p]
    assert {(s.epochs * s.iters, s.batch_size) for s in map(parse_short_name, names)} == {(200, 8)}
    assert [r[1] for r in rows].count(m4oe_table.MERGED_ID) == 4


def _summary(per_case: dict) -> dict:
    return {"metric_per_case": [{"prediction_file": f"/p/{c}.nii.gz", "metrics": {k: {"Dice": v} for k, v in d.items()}}
                                for c, d in per_case.items()],
            "mean": {k: {"Dice": v} for k, v in next(iter(per_case.values())).items()}}


def test_scores_by_source_from_nnunets_summary():
    nan = float("nan")
    merged = {"labels": {"background": 0, "liver": 1, "pancreas": 2}, "file_ending": ".nii.gz",
              MERGE_KEY: {"format_version": 1,
                          "sources": {"d602": {"dataset": "Dataset602_BTCV", "modality": "CT"},
                                      "d603": {"dataset": "Dataset603_ChaosT2", "modality": "MR"}},
                          "test_cases": {"d602_a": {"source": "d602", "modality": "CT", "labels": ["liver", "pancreas"]},
                                         "d603_b": {"source": "d603", "modality": "MR", "labels": ["liver"]}}}}
    summary = _summary({"d602_a": {"1": 0.9, "2": 0.3}, "d603_b": {"1": 0.8, "2": 0.0}})  # pancreas not scored on b
    source_of = {"self": None, "d602": "btcv", "d603": "chaos"}
    scores = m4oe_table.source_scores(summary, merged, source_of)
    assert scores == {"btcv": {"mean": pytest.approx(0.6), "liver": 0.9}, "chaos": {"mean": 0.8, "liver": 0.8}}
    single = {"labels": {"background": 0, "liver": 1, "spleen": 2}, "file_ending": ".nii.gz"}
    scores = m4oe_table.source_scores(_summary({"c": {"1": 0.7, "2": nan}}), single, {"self": "chaos"})
    assert scores == {"chaos": {"mean": 0.7, "liver": 0.7}}
    table = m4oe_table.markdown([{"label": "x", "scores": scores, "seconds_per_iteration": 1.234,
                                  "train_seconds": 90.0, "stage1_train_seconds": None}]).splitlines()
    assert table[2] == "| x | - | - | 0.700 | 0.700 | 1.5 | 1.23 |"
    assert "validation" in table[0]  # s / iteration: a whole epoch (validation included) over training iterations


# -- BTCV and CHAOS alone split like the merge ------------------------------------------------------------------

BTCV, CHAOS, MERGED = "Dataset602_BTCV", "Dataset603_ChaosT2", "Dataset611_BTCVChaos"
SOURCE_CASES = {"d602": [f"btcv_{i:02d}" for i in range(8)], "d603": [f"chaos_{i:02d}" for i in range(6)]}


def _write_json(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _planned_datasets(root, monkeypatch) -> dict:
    """Raw BTCV and CHAOS, the merge's preprocessed dataset.json and splits_final.json as the merge and nnU-Net's
    planner leave them, and empty preprocessed folders of the sources: ``prepare_datasets``' ``{id: raw folder}``."""
    raw, pre = root / "nnUNet_raw", root / "nnUNet_preprocessed"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    folders = {}
    for dataset_id, name, key in ((602, BTCV, "d602"), (603, CHAOS, "d603")):
        folders[dataset_id] = str(raw / name)
        _write_json(os.path.join(folders[dataset_id], "dataset.json"), {"file_ending": ".nii.gz"})
        os.makedirs(raw / name / "imagesTr")
        for case in SOURCE_CASES[key]:
            open(raw / name / "imagesTr" / f"{case}_0000.nii.gz", "w").close()
        os.makedirs(pre / name)
    folders[611] = str(raw / MERGED)
    merged_cases = {k: [f"{k}_{c}" for c in v] for k, v in SOURCE_CASES.items()}
    meta = {"format_version": 1, "sources": {"d602": {"dataset": BTCV}, "d603": {"dataset": CHAOS}},
            "cases": {c: {"source": k} for k, cases in merged_cases.items() for c in cases}, "test_cases": {}}
    _write_json(str(pre / MERGED / "dataset.json"), {"labels": {"background": 0}, MERGE_KEY: meta})
    _write_json(str(pre / MERGED / "splits_final.json"), stratified_splits(merged_cases))
    return folders


def test_sources_alone_get_the_merged_folds_without_prefix(tmp_path, monkeypatch):
    folders = _planned_datasets(tmp_path, monkeypatch)
    m4oe_table.write_source_splits(folders, log=lambda *_: None)
    merged = _read_json(str(tmp_path / "nnUNet_preprocessed" / MERGED / "splits_final.json"))
    for name, key in ((BTCV, "d602"), (CHAOS, "d603")):
        ours = _read_json(str(tmp_path / "nnUNet_preprocessed" / name / "splits_final.json"))
        assert len(ours) == len(merged) == 5
        for fold, merged_fold in zip(ours, merged):
            for part in ("train", "val"):
                assert sorted(fold[part]) == sorted(c[len(key) + 1:] for c in merged_fold[part]
                                                    if c.startswith(key + "_"))
        assert sorted(c for fold in ours for c in fold["val"]) == SOURCE_CASES[key]  # every case validated once
    # nnU-Net's stock split of these cases would differ: the file is what makes them train on the merge's cases
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    assert generate_crossval_split(SOURCE_CASES["d602"], seed=12345, n_splits=5)[0]["val"] != \
        _read_json(str(tmp_path / "nnUNet_preprocessed" / BTCV / "splits_final.json"))[0]["val"]


def test_prepare_datasets_splits_the_sources_after_planning(tmp_path, monkeypatch):
    folders = _planned_datasets(tmp_path, monkeypatch)
    os.makedirs(folders[611])  # the merge exists: reused
    merged_split = tmp_path / "nnUNet_preprocessed" / MERGED / "splits_final.json"
    planner_copy = merged_split.read_bytes()
    os.remove(merged_split)  # nnU-Net's planner copies it when it plans the merge
    planned = []

    def fake_plans(dataset_id, name, configuration, log=print):
        planned.append(dataset_id)
        if dataset_id == 611:
            merged_split.write_bytes(planner_copy)

    monkeypatch.setattr(m4oe_table, "write_shared_dataset", lambda shared, kind, dataset_id, **_: folders[dataset_id])
    monkeypatch.setattr(m4oe_table, "ensure_plans", fake_plans)
    assert m4oe_table.prepare_datasets("shared", log=lambda *_: None) == folders
    assert sorted(planned) == [602, 603, 611]
    for name in (BTCV, CHAOS):  # before any training reads it
        assert os.path.isfile(tmp_path / "nnUNet_preprocessed" / name / "splits_final.json")


def test_a_different_existing_split_is_refused_an_identical_one_kept(tmp_path, monkeypatch):
    folders = _planned_datasets(tmp_path, monkeypatch)
    target = tmp_path / "nnUNet_preprocessed" / BTCV / "splits_final.json"
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    random_split = generate_crossval_split(SOURCE_CASES["d602"], seed=12345, n_splits=5)  # what nnU-Net writes
    _write_json(str(target), random_split)
    with pytest.raises(FileExistsError, match=re.escape(str(target)) + ".*Delete it"):
        m4oe_table.write_source_splits(folders, log=lambda *_: None)
    assert _read_json(str(target)) == random_split  # left as it was
    os.remove(target)
    m4oe_table.write_source_splits(folders, log=lambda *_: None)
    ours = _read_json(str(target))
    _write_json(str(target), [{"train": f["train"][::-1], "val": f["val"][::-1]} for f in ours])  # same folds
    kept = target.read_bytes()
    m4oe_table.write_source_splits(folders, log=lambda *_: None)
    assert target.read_bytes() == kept


def test_a_merge_of_other_cases_is_refused(tmp_path, monkeypatch):
    folders = _planned_datasets(tmp_path, monkeypatch)
    open(os.path.join(folders[603], "imagesTr", "chaos_99_0000.nii.gz"), "w").close()  # not in the merge
    with pytest.raises(ValueError, match="does not cover exactly the training cases"):
        m4oe_table.write_source_splits(folders, log=lambda *_: None)


# -- training time: the whole compute of each row -----------------------------------------------------------------

def _fake_training(folder, epoch_seconds):
    import torch

    os.makedirs(folder, exist_ok=True)
    starts = [1000.0 + 100 * i for i in range(len(epoch_seconds))]
    torch.save({"logging": {"epoch_start_timestamps": starts,
                            "epoch_end_timestamps": [s + d for s, d in zip(starts, epoch_seconds)]}},
               os.path.join(folder, "checkpoint_final.pth"))


def test_training_time_sums_the_epochs_and_adds_stage_1(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    raw = tmp_path / MERGED
    merged_json = {"labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz",
                   MERGE_KEY: {"format_version": 1,
                               "sources": {"d602": {"dataset": BTCV, "modality": "CT"},
                                           "d603": {"dataset": CHAOS, "modality": "MR"}},
                               "test_cases": {"d602_a": {"source": "d602", "modality": "CT", "labels": ["liver"]},
                                              "d603_b": {"source": "d603", "modality": "MR", "labels": ["liver"]}}}}
    _write_json(str(raw / "dataset.json"), merged_json)
    epochs = {"stage1": [30.0, 50.0, 40.0], "stage2": [10.0, 20.0, 60.0]}

    def fake_train(dataset_id, name, trainer, configuration, fold, device, env=None, log=print):
        stage = "stage1" if "Pretrain" in trainer else "stage2"
        folder = str(tmp_path / "results" / trainer)
        _fake_training(folder, epochs[stage])
        _write_json(os.path.join(folder, "heldout_predictions", "summary.json"),
                    _summary({"d602_a": {"1": 0.9}, "d603_b": {"1": 0.8}}))
        return {"output_folder": folder, "ran": False, "peak_rss_bytes": None}

    monkeypatch.setattr(m4oe_table, "train_or_reuse", fake_train)
    label, dataset_id, trainer, pretrain = m4oe_table.runs(3, 10)[-1]
    assert pretrain is not None
    mae = m4oe_table.run_one(label, dataset_id, trainer, pretrain, {dataset_id: str(raw)}, str(tmp_path), 10, "cpu",
                             log=lambda *_: None)
    assert mae["train_seconds"] == pytest.approx(120.0 + 90.0) and mae["stage1_train_seconds"] == pytest.approx(120.0)
    assert mae["seconds_per_iteration"] == pytest.approx(20.0 / 10)  # stage 2's median epoch
    label, dataset_id, trainer, pretrain = m4oe_table.runs(3, 10)[2]
    plain = m4oe_table.run_one(label, dataset_id, trainer, None, {dataset_id: str(raw)}, str(tmp_path), 10, "cpu",
                               log=lambda *_: None)
    assert plain["train_seconds"] == pytest.approx(90.0) and plain["stage1_train_seconds"] is None
    table = m4oe_table.markdown([plain, mae]).splitlines()
    assert "training time" in table[0]
    assert table[2].split(" | ")[5] == "1.5"
    assert table[3].split(" | ")[5] == "3.5 (2.0 + 1.5)¹"
    assert any(line.startswith("¹") and "MAE" in line for line in table[4:])


def _row(label, trainer, dice):
    return {"label": label, "trainer": trainer, "scores": {"btcv": {"mean": dice}}}


def test_rows_of_an_earlier_invocation_stay_and_a_measured_again_row_replaces_its_own():
    (first, _, t1, _), (second, _, t2, _), (third, _, t3, _) = m4oe_table.runs()[:3]
    earlier = [_row(third, t3, 0.3), _row(first, t1, 0.1)]
    merged = m4oe_table.merge_rows(earlier, _row(second, t2, 0.2))
    assert [r["label"] for r in merged] == [first, second, third]  # run order, whatever the file's
    again = m4oe_table.merge_rows(merged, _row(first, t1, 0.5))
    assert [r["scores"]["btcv"]["mean"] for r in again] == [0.5, 0.2, 0.3]


def test_a_row_file_of_another_budget_is_refused(tmp_path):
    path = str(tmp_path / "m4oe_table.json")
    label, _, trainer, _ = m4oe_table.runs()[0]
    _write_json(path, [_row(label, trainer, 0.1)])
    assert m4oe_table.read_rows(path, m4oe_table.runs())[0]["label"] == label
    with pytest.raises(SystemExit, match="another budget"):
        m4oe_table.read_rows(path, m4oe_table.runs(3, 10))
    assert m4oe_table.read_rows(str(tmp_path / "none.json"), m4oe_table.runs()) == []
