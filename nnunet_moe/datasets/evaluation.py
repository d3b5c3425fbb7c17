"""Dice per source dataset of a merged dataset, each case scored only on the labels its source annotates.

Reference: Jiang et al., "M4oE", MICCAI 2024 (Tables 2-3 report Dice per dataset). A case of a source that
annotates liver/kidneys/spleen says nothing about the pancreas, so the pancreas is not scored on it: its
Dice per label would count every pancreas the model finds as a false positive.

Dice per case and label as nnU-Net's ``compute_metrics``: ``2 TP / (2 TP + FP + FN)``, NaN when the label is
in neither the prediction nor the reference; the per-source value of a label is the mean over that source's
cases ignoring NaN (nnU-Net's ``nanmean``), and the source's mean Dice the mean of its labels' values.

- :func:`per_source_dice`: pure function, ``{case: (prediction, reference)}`` label arrays + the merged
  ``dataset.json`` -> summary dict (used by the M4oE trainer's final validation and reusable by benchmarks);
- :func:`per_source_dice_folders`: the same on two folders of label files (nnU-Net's reader);
- :func:`format_per_source`: one log line per source.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import numpy as np

from nnunet_moe.datasets.metadata import case_record, merge_metadata

__all__ = ["per_source_dice", "per_source_dice_folders", "format_per_source", "SUMMARY_NAME"]

SUMMARY_NAME = "summary_per_source.json"


def _dice(prediction: np.ndarray, reference: np.ndarray, value: int) -> float:
    """nnU-Net's per-label Dice (its ``compute_tp_fp_fn_tn`` and ``compute_metrics`` rule)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    tp, fp, fn, _ = (int(n) for n in compute_tp_fp_fn_tn(reference == value, prediction == value))
    return float("nan") if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _nanmean(values: Iterable[float]) -> float | None:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else None  # None: JSON has no NaN


def per_source_dice(cases: Mapping[str, tuple], dataset_json: dict) -> dict:
    """Dice per source and label from ``{case: (prediction, reference)}`` integer label arrays.

    Returns ``{"sources": {source: {"dataset", "modality", "num_cases", "labels": {name: {"value", "dice",
    "num_cases_scored"}}, "mean_dice"}}, "per_case": {case: {"source", "dice": {name: dice or None}}}}``;
    ``dice`` None where no case had the label in prediction or reference. An unknown case is a ValueError
    (from :func:`~nnunet_moe.datasets.metadata.case_record`).
    """
    meta = merge_metadata(dataset_json)
    values = {name: int(v) for name, v in dataset_json["labels"].items() if name not in ("background", "ignore")}
    per_case, scores = {}, {}
    for case in sorted(cases):
        prediction, reference = (np.asarray(a) for a in cases[case])
        if prediction.shape != reference.shape:
            raise ValueError(f"case {case!r}: prediction shape {prediction.shape} differs from the reference "
                             f"{reference.shape}; predict the case again with this dataset's plans.")
        record = case_record(meta, case)
        dice = {}
        for name in record["labels"]:
            if name not in values:
                raise ValueError(f"case {case!r} is recorded with label {name!r}, which dataset.json's 'labels' do "
                                 f"not list: the merge record is damaged; merge the sources again.")
            dice[name] = _dice(prediction, reference, values[name])
            scores.setdefault(record["source"], {}).setdefault(name, []).append(dice[name])
        per_case[case] = {"source": record["source"],
                          "dice": {k: None if np.isnan(v) else v for k, v in dice.items()}}
    sources = {}
    for key in sorted(scores):
        info = meta["sources"].get(key, {})
        labels = {name: {"value": values[name], "dice": _nanmean(d),
                         "num_cases_scored": int(sum(not np.isnan(v) for v in d))}
                  for name, d in sorted(scores[key].items(), key=lambda item: values[item[0]])}
        means = [v["dice"] for v in labels.values() if v["dice"] is not None]
        sources[key] = {"dataset": info.get("dataset"), "modality": info.get("modality"),
                        "num_cases": sum(1 for c in per_case.values() if c["source"] == key), "labels": labels,
                        "mean_dice": float(np.mean(means)) if means else None}
    return {"sources": sources, "per_case": per_case}


def per_source_dice_folders(prediction_folder: str, reference_folder: str, dataset_json: dict,
                            cases: Iterable[str] | None = None, output_file: str | None = None) -> dict:
    """:func:`per_source_dice` on label files ``<case><file_ending>`` in two folders (``cases``: all predicted
    files of the folder); ``output_file``: also written there as JSON."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    ending = dataset_json["file_ending"]
    if cases is None:
        cases = sorted(f[: -len(ending)] for f in os.listdir(prediction_folder) if f.endswith(ending))
    cases = list(cases)
    if not cases:
        raise ValueError(f"no predictions (*{ending}) in {prediction_folder}: predict the cases first.")
    reader = None
    arrays = {}
    for case in cases:
        paths = [os.path.join(folder, case + ending) for folder in (prediction_folder, reference_folder)]
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: per-source Dice needs the prediction and the reference "
                                        f"of case {case!r}.")
        if reader is None:
            reader = determine_reader_writer_from_dataset_json(dataset_json, paths[1], allow_nonmatching_filename=True,
                                                               verbose=False)()
        arrays[case] = tuple(reader.read_seg(p)[0][0] for p in paths)
    summary = per_source_dice(arrays, dataset_json)
    if output_file is not None:
        with open(output_file, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


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
