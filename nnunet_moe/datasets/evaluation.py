"""Dice per source dataset of a merged dataset, each case scored only on the labels its source annotates.

Reference: Jiang et al., "M4oE", MICCAI 2024 (Tables 2-3 report Dice per dataset). A case of a source that
annotates liver/kidneys/spleen says nothing about the pancreas, so the pancreas is not scored on it: its
Dice per label would count every pancreas the model finds as a false positive.

The per-case Dice values are not computed here: they come from whoever scored the cases, nnU-Net's
``summary.json`` (its final validation, ``nnUNetv2_evaluate_folder``: NaN where the label is in neither
prediction nor reference) or ``nnunet-moe benchmark``'s per-case records (its own documented convention).
This module only sorts them by source: the per-source value of a label is the mean over that source's
cases ignoring NaN (nnU-Net's ``nanmean``), and the source's mean Dice the mean of its labels' values.

- :func:`per_source_dice`: ``{case: {label value: Dice}}`` + the merged ``dataset.json`` -> summary dict;
- :func:`case_dice_from_nnunet_summary`: that input from nnU-Net's ``summary.json``;
- :func:`format_per_source`: one log line per source; :func:`per_source_markdown`: a table of several models.
"""
from __future__ import annotations

import math
import os
from typing import Mapping

import numpy as np

from nnunet_moe.datasets.metadata import case_record, merge_metadata

__all__ = ["per_source_dice", "case_dice_from_nnunet_summary", "format_per_source", "per_source_markdown",
           "SUMMARY_NAME"]

SUMMARY_NAME = "summary_per_source.json"


def _nanmean(values) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else None  # None: JSON has no NaN


def per_source_dice(case_dice: Mapping[str, Mapping[int, float]], dataset_json: dict) -> dict:
    """Dice per source and label from ``{case: {label value: Dice (NaN: not scorable)}}``.

    Returns ``{"sources": {source: {"dataset", "modality", "num_cases", "labels": {name: {"value", "dice",
    "num_cases_scored"}}, "mean_dice"}}, "per_case": {case: {"source", "dice": {name: dice or None}}}}``;
    ``dice`` None where no case of the source could be scored on the label. An unknown case is a ValueError
    (from :func:`~nnunet_moe.datasets.metadata.case_record`), as is a case without a Dice for a label its
    source annotates.
    """
    meta = merge_metadata(dataset_json)
    values = {name: int(v) for name, v in dataset_json["labels"].items() if name not in ("background", "ignore")}
    per_case, scores = {}, {}
    for case in sorted(case_dice):
        record = case_record(meta, case)
        dice = {}
        for name in record["labels"]:
            if name not in values:
                raise ValueError(f"case {case!r} is recorded with label {name!r}, which dataset.json's 'labels' do "
                                 f"not list: the merge record is damaged; merge the sources again.")
            if values[name] not in case_dice[case]:
                raise ValueError(f"case {case!r}: no Dice for label {name!r} (value {values[name]}), which its source "
                                 f"annotates; score the case on every label of dataset.json.")
            dice[name] = float(case_dice[case][values[name]])
            scores.setdefault(record["source"], {}).setdefault(name, []).append(dice[name])
        per_case[case] = {"source": record["source"],
                          "dice": {k: None if math.isnan(v) else v for k, v in dice.items()}}
    sources = {}
    for key in sorted(scores):
        info = meta["sources"].get(key, {})
        labels = {name: {"value": values[name], "dice": _nanmean(d),
                         "num_cases_scored": int(sum(not math.isnan(v) for v in d))}
                  for name, d in sorted(scores[key].items(), key=lambda item: values[item[0]])}
        means = [v["dice"] for v in labels.values() if v["dice"] is not None]
        sources[key] = {"dataset": info.get("dataset"), "modality": info.get("modality"),
                        "num_cases": sum(1 for c in per_case.values() if c["source"] == key), "labels": labels,
                        "mean_dice": float(np.mean(means)) if means else None}
    return {"sources": sources, "per_case": per_case}


def case_dice_from_nnunet_summary(summary: dict, file_ending: str, cases=None) -> dict:
    """``{case: {label value: Dice}}`` from nnU-Net's ``summary.json`` (``metric_per_case``: one entry per
    prediction file, metrics keyed by label value); ``cases``: only these (all when None)."""
    out = {}
    for entry in summary["metric_per_case"]:
        name = os.path.basename(entry["prediction_file"])
        case = name[: -len(file_ending)] if name.endswith(file_ending) else name
        if cases is None or case in cases:
            out[case] = {int(k): float(v["Dice"]) for k, v in entry["metrics"].items()}
    missing = sorted(set(cases or ()) - set(out))
    if missing:
        raise ValueError(f"nnU-Net's summary has no entry for the case(s) {', '.join(missing)}: it was written for "
                         f"other predictions; evaluate the validation folder again.")
    return out


def format_per_source(summary: dict) -> list[str]:
    """One line per source: ``d502 (Dataset502_X, CT, 3 cases): liver 0.9123, spleen 0.8 | mean 0.85``."""
    lines = []
    for key, s in summary["sources"].items():
        labels = ", ".join(f"{name} {'n/a' if v['dice'] is None else format(v['dice'], '.4f')}"
                           for name, v in s["labels"].items())
        mean = "n/a" if s["mean_dice"] is None else f"{s['mean_dice']:.4f}"
        lines.append(f"Dice of source {key} ({s['dataset']}, {s['modality']}, {s['num_cases']} cases, scored on its "
                     f"own labels only): {labels} | mean {mean}")
    return lines


def per_source_markdown(summaries: Mapping[str, dict]) -> str:
    """One Markdown row per (model, source) from ``{model: per_source_dice(...)}``: labels, then the mean."""
    names = list(dict.fromkeys(n for s in summaries.values() for src in s["sources"].values() for n in src["labels"]))
    head = "| model | source | modality | cases | " + " | ".join(names) + " | mean |\n|---|---|---|---:|" + \
        "---:|" * (len(names) + 1)
    body = []
    for model, summary in summaries.items():
        for key, s in summary["sources"].items():
            cells = [("n/a" if s["labels"][n]["dice"] is None else f"{s['labels'][n]['dice']:.4f}")
                     if n in s["labels"] else "-" for n in names]
            mean = "n/a" if s["mean_dice"] is None else f"{s['mean_dice']:.4f}"
            body.append(f"| {model} | {key} ({s['dataset']}) | {s['modality']} | {s['num_cases']} | "
                        + " | ".join(cells) + f" | {mean} |")
    return "\n".join([head] + body)
