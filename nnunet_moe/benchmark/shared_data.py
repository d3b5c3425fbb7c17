"""The development datasets in ``../shared/data`` as nnU-Net raw datasets (benchmarks and optional tests).

Two real abdominal sets of different modalities share liver, kidneys and spleen under different label
values, which is what M4oE's merge needs:

- ``btcv``: 24 contrast CT volumes, 13 organs (8-bit windowed intensities, see its SOURCE.md), channel "CT";
- ``chaos_t2``: 16 T2-SPIR MRI volumes, liver / right kidney / left kidney / spleen, channel "T2".

Label names are written the same in both (``liver``, ``right kidney``, ``left kidney``, ``spleen``), so
``merge-datasets`` matches them without aliases. Neither set may be shipped with the package: these
functions read them from a folder given by the caller (``find_shared_data`` looks next to the project).
``spacing`` resamples a CPU-sized copy (``datasets.raw_dataset``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from nnunet_moe.datasets.raw_dataset import write_raw_dataset

__all__ = ["SharedSet", "SHARED_SETS", "find_shared_data", "write_shared_dataset"]


@dataclass(frozen=True)
class SharedSet:
    folder: str  # under ../shared/data
    name: str  # nnU-Net dataset name after the id
    channel: str
    labels: tuple  # foreground names in value order 1, 2, ...
    modality: str  # for merge-datasets


BTCV_LABELS = ("spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
               "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland",
               "left adrenal gland")
SHARED_SETS = {
    "btcv": SharedSet("btcv", "BTCV", "CT", BTCV_LABELS, "CT"),
    "chaos_t2": SharedSet("chaos_t2", "ChaosT2", "T2", ("liver", "right kidney", "left kidney", "spleen"), "MR"),
}


def find_shared_data(start: str | None = None) -> str | None:
    """``<project>/../shared/data`` when it holds both sets, else None (``start``: a folder inside the project)."""
    here = os.path.abspath(start or os.getcwd())
    candidates = []
    while True:
        candidates.append(os.path.join(here, "shared", "data"))
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    for candidate in candidates:
        if all(os.path.isdir(os.path.join(candidate, s.folder, "images")) for s in SHARED_SETS.values()):
            return candidate
    return None


def write_shared_dataset(root: str, kind: str, dataset_id: int, num_train: int | None = None, num_test: int = 0,
                         spacing=None, log=print) -> str:
    """``$nnUNet_raw/Dataset<id>_<Kind>`` from ``root/<kind>``: the first ``num_train`` cases (all but the last
    ``num_test`` when None) for training, the last ``num_test`` held out; returns its folder."""
    if kind not in SHARED_SETS:
        raise ValueError(f"unknown shared set {kind!r}: one of {', '.join(SHARED_SETS)}")
    spec = SHARED_SETS[kind]
    images, labels = (os.path.join(root, spec.folder, sub) for sub in ("images", "labels"))
    cases = sorted(f[: -len(".nii.gz")] for f in os.listdir(images) if f.endswith(".nii.gz"))
    if num_test < 0 or len(cases) - num_test < 5:
        raise ValueError(f"{kind}: {len(cases)} cases, num_test={num_test} leaves fewer than nnU-Net's 5 training cases")
    test = cases[len(cases) - num_test:] if num_test else []
    train = cases[: len(cases) - num_test]
    if num_train is not None:
        train = train[:num_train]
    pairs = {c: (os.path.join(images, c + ".nii.gz"), os.path.join(labels, c + ".nii.gz")) for c in train + test}
    marker = {"shared": kind, "train": train, "test": test, "spacing": None if spacing is None else list(spacing)}
    return write_raw_dataset(dataset_id, spec.name, pairs, train,
                             test, {"0": spec.channel},
                             {"background": 0, **{n: i + 1 for i, n in enumerate(spec.labels)}}, marker,
                             spacing=spacing, extra={"name": f"{kind} (development copy, not for redistribution)"},
                             source_md=os.path.join(root, spec.folder, "SOURCE.md"), cases_phrase=f"{kind} cases",
                             log=log)
