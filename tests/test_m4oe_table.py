"""The M4oE benchmark's bookkeeping: its runs, scores by source from nnU-Net's summary, the table."""
from __future__ import annotations

import pytest

from nnunet_moe.benchmark import m4oe_table
from nnunet_moe.datasets.metadata import MERGE_KEY
from nnunet_moe.trainer_names import parse_short_name


def test_every_run_has_the_same_budget():
    rows = m4oe_table.runs()
    names = [t for _, _, t, _ in rows] + [p for *_, p in rows if p]
    assert {(s.epochs * s.iters, s.batch_size) for s in map(parse_short_name, names)} == {(1000, 8)}
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
    table = m4oe_table.markdown([{"label": "x", "scores": scores, "seconds_per_iteration": 1.234}]).splitlines()
    assert table[2] == "| x | - | - | 0.700 | 0.700 | 1.23 |"
