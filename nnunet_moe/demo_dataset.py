"""The bundled real demo data (MSD Hippocampus subset) written as an nnU-Net raw dataset.

``write_demo_dataset`` copies the shipped NIfTI files unchanged into
``$nnUNet_raw/Dataset<id>_<name>/`` with nnU-Net's file naming: the first cases go to
``imagesTr``/``labelsTr`` (nnU-Net's 5-fold cross-validation splits them), the last
``num_test`` cases to ``imagesTs``/``labelsTs`` (held out, used for prediction and Dice).

It never overwrites (``datasets.raw_dataset.write_raw_dataset``): an existing identical demo dataset is
reused, anything else at the same dataset id is refused with a message naming the folder.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from nnunet_moe.datasets.raw_dataset import write_raw_dataset

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hippocampus")
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}
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
    pairs = {c: (os.path.join(DATA_DIR, "images", c + ".nii.gz"), os.path.join(DATA_DIR, "labels", c + ".nii.gz"))
             for c in cases}
    extra = {
        "name": "Hippocampus (MSD Task04 subset, nnunet-moe demo)",
        "licence": "CC BY-SA 4.0",
        "reference": "Simpson et al. 2019 (arXiv:1902.09063); Antonelli et al., Nat. Commun. 13, 4128 (2022)",
        "description": "Real MRI cases bundled with nnunet-moe; imagesTs/labelsTs are held out for the demo.",
    }
    folder = write_raw_dataset(dataset_id, dataset_name, pairs, train, test, {"0": "MRI"}, LABELS,
                               {"train": train, "test": test}, extra=extra,
                               source_md=os.path.join(DATA_DIR, "SOURCE.md"), what="nnunet-moe demo dataset",
                               other_id_hint="nnunet-moe demo --dataset-id",
                               cases_phrase="real hippocampus MRI cases", log=log)
    return DemoDataset(dataset_id, f"Dataset{dataset_id:03d}_{dataset_name}", folder, train, test)
