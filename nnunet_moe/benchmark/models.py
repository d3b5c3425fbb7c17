"""The models ``nnunet-moe benchmark`` compares: nnU-Net results folders, their checks, and loading them.

A trained model is nnU-Net's results folder
``$nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>/fold_<f>/<checkpoint>``, loaded with
nnU-Net's own ``nnUNetPredictor.initialize_from_trained_model_folder``. Every problem that keeps one model
out (no folder, no fold, no checkpoint, other labels or channels than the reference dataset) is a
sentence naming the path and what to do; the benchmark reports it and goes on with the other models.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_PLANS = "nnUNetPlans"
DEFAULT_CHECKPOINT = "checkpoint_final.pth"


@dataclass
class Model:
    """One model to benchmark: its report name, the dataset.json it was planned for, and how to load it."""

    name: str
    dataset_json_path: str
    source: str  # where the weights come from, for messages
    load: Callable  # options -> nnUNetPredictor
    scored: bool = True  # False: Dice/HD95/NSD are not computed (untrained weights)


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def resolve_dataset_name(dataset: str, folders: dict) -> str:
    """``DatasetXXX_Name`` for an id ("501", "5") or a full name, looked up in nnU-Net's three folders.

    nnunetv2.paths reads the environment once, when it is first imported; the folders are passed in
    here (read from the environment at call time) so that a later change of the variables counts.
    """
    dataset = str(dataset).strip()
    if dataset.startswith("Dataset"):
        return dataset
    try:
        dataset_id = int(dataset)
    except ValueError:
        raise ValueError(f"-d {dataset!r} is neither a dataset id (e.g. 501) nor a name (e.g. Dataset501_Hippocampus)")
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id {dataset_id} is outside nnU-Net's range 1..999")
    prefix = f"Dataset{dataset_id:03d}_"
    names = set()
    for base in folders.values():
        if os.path.isdir(base):
            names.update(d for d in os.listdir(base) if d.startswith(prefix) and os.path.isdir(os.path.join(base, d)))
    if not names:
        searched = ", ".join(f"{var}={path}" for var, path in folders.items())
        raise ValueError(f"unknown dataset id {dataset_id}: no folder {prefix}* in {searched}")
    if len(names) > 1:
        raise ValueError(f"dataset id {dataset_id} is ambiguous: {sorted(names)} share it; pass the full name with -d")
    return names.pop()


def model_folder(results: str, dataset_name: str, trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's results folder of one trainer (``get_output_folder``'s layout)."""
    return os.path.join(results, dataset_name, f"{trainer}__{plans}__{configuration}")


def trained_trainers(results: str, dataset_name: str, plans: str, configuration: str, fold: str,
                     checkpoint: str = DEFAULT_CHECKPOINT) -> list:
    """Trainer names with ``fold_<fold>/<checkpoint>`` for this plans and configuration, sorted."""
    base = os.path.join(results, dataset_name)
    if not os.path.isdir(base):
        return []
    suffix = f"__{plans}__{configuration}"
    return sorted(
        d[: -len(suffix)] for d in os.listdir(base)
        if d.endswith(suffix) and os.path.isfile(os.path.join(base, d, f"fold_{fold}", checkpoint))
    )


def checkpoint_problem(folder: str, trainer: str, fold: str, checkpoint: str, dataset_name: str,
                       configuration: str, plans: str) -> str | None:
    """Why ``folder/fold_<fold>/<checkpoint>`` cannot be loaded (None when it can)."""
    if not os.path.isdir(folder):
        parent, suffix = os.path.dirname(folder), f"__{plans}__{configuration}"
        present = sorted(d[: -len(suffix)] for d in os.listdir(parent) if d.endswith(suffix)) \
            if os.path.isdir(parent) else []
        hint = f" Trainers with {plans} {configuration} results: {', '.join(present)}." if present else ""
        return (f"trainer {trainer}: no results folder {folder} (train it with `nnUNetv2_train {dataset_name} "
                f"{configuration} {fold} -tr {trainer} -p {plans}`, or check -tr/-p/-c).{hint}")
    fold_dir = os.path.join(folder, f"fold_{fold}")
    if not os.path.isdir(fold_dir):
        folds = sorted(d for d in os.listdir(folder) if d.startswith("fold_"))
        return f"trainer {trainer}: no folder fold_{fold} in {folder} (folds present: {', '.join(folds) or 'none'})."
    path = os.path.join(fold_dir, checkpoint)
    if not os.path.isfile(path):
        others = sorted(f for f in os.listdir(fold_dir) if f.endswith(".pth"))
        hint = (f" Found {', '.join(others)}: the training may be unfinished; pass --checkpoint {others[0]} to use "
                f"another checkpoint." if others else " No checkpoint at all: has training started?")
        return f"trainer {trainer}: no checkpoint {path}.{hint}"
    for name in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            return f"trainer {trainer}: {os.path.join(folder, name)} is missing (nnU-Net writes it when training starts)."
    return None


def _normalised_labels(dataset_json: dict) -> dict:
    """dataset.json ``labels`` with region lists as tuples, comparable with ``==``."""
    return {name: tuple(v) if isinstance(v, (list, tuple)) else int(v) for name, v in dataset_json["labels"].items()}


def num_channels(dataset_json: dict) -> int:
    return len(dataset_json.get("channel_names", dataset_json.get("modality", {})))


def compatibility_problem(name: str, model_json: dict, model_json_path: str, reference: dict,
                          reference_path: str) -> str | None:
    """Why a model cannot be scored against the reference dataset (labels or channels differ)."""
    model_labels, reference_labels = _normalised_labels(model_json), _normalised_labels(reference)
    if model_labels != reference_labels or model_json.get("regions_class_order") != reference.get("regions_class_order"):
        return (f"trainer {name}: its labels {model_labels} ({model_json_path}) differ from the reference labels "
                f"{reference_labels} ({reference_path}); a Dice per label would compare different structures, "
                f"so this model is skipped.")
    if num_channels(model_json) != num_channels(reference):
        return (f"trainer {name}: it expects {num_channels(model_json)} input channels "
                f"{model_json.get('channel_names')} ({model_json_path}) but the reference dataset has "
                f"{num_channels(reference)} {reference.get('channel_names')} ({reference_path}); skipped.")
    return None


def scored_labels(dataset_json: dict) -> tuple:
    """(labels or regions to score, {label: class name}) from a dataset.json, background left out."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    manager = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    if manager.has_regions:
        labels = [tuple(r) if isinstance(r, (list, tuple)) else int(r) for r in manager.foreground_regions]
    else:
        labels = [int(label) for label in manager.foreground_labels]
    names = {}
    for name, value in dataset_json["labels"].items():
        key = tuple(value) if isinstance(value, (list, tuple)) else int(value)
        names.setdefault(key, name)
    return labels, {label: names.get(label, str(label)) for label in labels}


def new_predictor(options):
    """An uninitialised ``nnUNetPredictor`` with the benchmark's inference settings, as ``nnUNetv2_predict`` makes it."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = torch.device(options.device)
    return nnUNetPredictor(tile_step_size=options.step_size, use_gaussian=True, use_mirroring=options.tta,
                           perform_everything_on_device=device.type == "cuda", device=device,
                           verbose=False, verbose_preprocessing=False, allow_tqdm=False)


def load_predictor(folder: str, fold: str, options):
    """nnU-Net's predictor for one trained fold, as ``nnUNetv2_predict`` builds it."""
    # nnU-Net prints a CPU notice on construction and its trainer-class search line by line; one
    # model's load would push the progress bar off the screen
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = new_predictor(options)
        predictor.initialize_from_trained_model_folder(folder, (fold if fold == "all" else int(fold),),
                                                       checkpoint_name=options.checkpoint)
    if predictor.configuration_manager.previous_stage_name is not None:
        raise ValueError(f"configuration {predictor.configuration_manager.configuration} is a cascade stage; "
                         f"benchmarking cascades (which need the previous stage's predictions) is not supported")
    return predictor


def trained_model(results: str, dataset_name: str, trainer: str, plans: str, configuration: str, fold: str) -> Model:
    folder = model_folder(results, dataset_name, trainer, plans, configuration)
    return Model(trainer, os.path.join(folder, "dataset.json"), f"{folder} fold {fold}",
                 lambda options: load_predictor(folder, fold, options))
