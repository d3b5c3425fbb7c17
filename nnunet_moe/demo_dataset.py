"""The bundled real demo data (MSD Hippocampus subset) written as an nnU-Net raw dataset.

``write_demo_dataset`` copies the shipped NIfTI files unchanged into
``$nnUNet_raw/Dataset<id>_<name>/`` with nnU-Net's file naming: the first cases go to
``imagesTr``/``labelsTr`` (nnU-Net's 5-fold cross-validation splits them), the last
``num_test`` cases to ``imagesTs``/``labelsTs`` (held out, used for prediction and Dice).

It never overwrites: an existing identical demo dataset is reused, anything else at the
same dataset id is refused with a message naming the folder.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass

from nnunet_moe.nnunet_paths import datasets_with_id

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hippocampus")
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}
MARKER_KEY = "nnunet_moe_demo"
# where `nnunet-moe demo` puts the data and what it trains; `nnunet-moe benchmark --demo` looks there
DEFAULT_DATASET_ID = 501
DEFAULT_DATASET_NAME = "Hippocampus"
DEFAULT_CONFIGURATION = "3d_fullres"


def bundled_cases() -> list:
    """Case ids of the shipped subset, sorted (e.g. 'hippocampus_001')."""
    files = sorted(glob.glob(os.path.join(DATA_DIR, "images", "*.nii.gz")))
    if not files:
        raise FileNotFoundError(f"The bundled demo data is missing from {DATA_DIR}; reinstall nnunet-moe.")
    return [os.path.basename(f)[: -len(".nii.gz")] for f in files]


@dataclass
class DemoDataset:
    dataset_id: int
    name: str  # DatasetXXX_Name
    folder: str
    train_cases: list
    test_cases: list

    @property
    def images_ts(self) -> str:
        return os.path.join(self.folder, "imagesTs")

    @property
    def labels_ts(self) -> str:
        return os.path.join(self.folder, "labelsTs")


def write_demo_dataset(dataset_id: int = DEFAULT_DATASET_ID, dataset_name: str = DEFAULT_DATASET_NAME, num_test: int = 10,
                       num_train: int | None = None, log=print) -> DemoDataset:
    """Write (or reuse) the demo dataset in ``$nnUNet_raw``; refuses to touch anything else."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"Dataset id {dataset_id} is outside nnU-Net's range 1..999.")
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise RuntimeError("nnUNet_raw is not set: set it (export nnUNet_raw=/path) or let `nnunet-moe demo` set it.")
    cases = bundled_cases()
    if not 1 <= num_test <= len(cases) - 5:
        raise ValueError(f"num_test={num_test}: need 1..{len(cases) - 5} (nnU-Net's 5 folds need >= 5 training cases).")
    train, test = cases[:-num_test], cases[-num_test:]
    if num_train is not None:
        if num_train < 5:
            raise ValueError(f"num_train={num_train}: nnU-Net's 5-fold split needs at least 5 training cases.")
        train = train[:num_train]
    name = f"Dataset{dataset_id:03d}_{dataset_name}"
    folder = os.path.join(raw, name)
    marker = {"train": train, "test": test}

    others = [p for p in datasets_with_id(dataset_id) if os.path.basename(p) != name]
    if others:
        raise FileExistsError(
            f"Dataset id {dataset_id} is already used by {others[0]}. nnunet-moe will not touch it: "
            f"choose another id (e.g. `nnunet-moe demo --dataset-id {dataset_id + 1}`)."
        )
    ds = DemoDataset(dataset_id, name, folder, train, test)
    if os.path.exists(folder):
        existing = os.path.join(folder, "dataset.json")
        try:
            with open(existing) as f:
                same = json.load(f).get(MARKER_KEY) == marker
        except (OSError, ValueError):
            same = False
        if not same:
            raise FileExistsError(
                f"{folder} exists and is not this nnunet-moe demo dataset (its dataset.json differs). "
                f"Nothing was changed. Choose another id with --dataset-id or another name with --dataset-name."
            )
        log(f"Reusing the demo dataset at {folder}")
        return ds

    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)  # only our own unfinished write
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(tmp, sub))
    for split, ids in (("Tr", train), ("Ts", test)):
        for case in ids:
            shutil.copyfile(os.path.join(DATA_DIR, "images", case + ".nii.gz"),
                            os.path.join(tmp, f"images{split}", case + "_0000.nii.gz"))
            shutil.copyfile(os.path.join(DATA_DIR, "labels", case + ".nii.gz"),
                            os.path.join(tmp, f"labels{split}", case + ".nii.gz"))
    dataset_json = {
        "channel_names": {"0": "MRI"},
        "labels": LABELS,
        "numTraining": len(train),
        "file_ending": ".nii.gz",
        "name": "Hippocampus (MSD Task04 subset, nnunet-moe demo)",
        "licence": "CC BY-SA 4.0",
        "reference": "Simpson et al. 2019 (arXiv:1902.09063); Antonelli et al., Nat. Commun. 13, 4128 (2022)",
        "description": "Real MRI cases bundled with nnunet-moe; imagesTs/labelsTs are held out for the demo.",
        MARKER_KEY: marker,
    }
    with open(os.path.join(tmp, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    shutil.copyfile(os.path.join(DATA_DIR, "SOURCE.md"), os.path.join(tmp, "SOURCE.md"))
    os.rename(tmp, folder)
    log(f"Wrote {len(train)} training and {len(test)} held-out real hippocampus MRI cases to {folder}")
    return ds
