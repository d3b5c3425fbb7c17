"""The cases ``nnunet-moe benchmark`` predicts: image files of one case with its reference label file.

Two sources, both with nnU-Net's file naming (image ``<case>_<XXXX><ending>`` per channel, label
``<case><ending>``): every case of an image folder with its label folder (``-i``/``-l``), or the
validation cases of a fold (``splits_final.json``; images/labels from the raw dataset's
``imagesTr``/``labelsTr``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass


@dataclass
class Case:
    identifier: str
    image_files: list
    label_file: str


def _case_files(image_folder: str, identifiers: list, file_ending: str, num_channels: int) -> dict:
    from nnunetv2.utilities.utils import create_paths_fn

    files = sorted(f for f in os.listdir(image_folder) if f.endswith(file_ending))
    grouped = {}
    for identifier in identifiers:
        paths = create_paths_fn(image_folder, files, file_ending, identifier)
        if len(paths) != num_channels:
            expected = [f"{identifier}_{c:04d}{file_ending}" for c in range(num_channels)]
            raise ValueError(f"case {identifier}: expected {num_channels} image file(s) {expected} in {image_folder}, "
                             f"found {[os.path.basename(p) for p in paths]}")
        grouped[identifier] = paths
    return grouped


def _check_folders(image_folder: str, label_folder: str) -> None:
    for flag, folder in (("-i", image_folder), ("-l", label_folder)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} {folder} is not a folder")


def cases_from_folders(image_folder: str, label_folder: str, file_ending: str, num_channels: int) -> list:
    """Every case of an nnU-Net-style image folder with its label file."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    _check_folders(image_folder, label_folder)
    identifiers = [str(i) for i in get_identifiers_from_splitted_dataset_folder(image_folder, file_ending)]
    if not identifiers:
        raise ValueError(f"no images named <case>_<XXXX>{file_ending} in {image_folder} (nnU-Net's naming, "
                         f"file ending from dataset.json)")
    return _cases(image_folder, label_folder, identifiers, file_ending, num_channels)


def folder_naming(image_folder: str, label_folder: str) -> tuple:
    """(file ending, number of channels) of an nnU-Net-style image folder, for cases without a dataset.json."""
    _check_folders(image_folder, label_folder)
    names = [re.fullmatch(r".+_(\d{4})(\.[A-Za-z0-9.]+)", f) for f in sorted(os.listdir(image_folder))]
    endings = sorted({m.group(2) for m in names if m})
    if len(endings) != 1:
        found = f"endings {endings}" if endings else "none"
        raise ValueError(f"expected images named <case>_<XXXX><ending> with one file ending in {image_folder} "
                         f"(nnU-Net's naming, e.g. case_0000.nii.gz); found {found}")
    return endings[0], len({m.group(1) for m in names if m})


def _cases(image_folder, label_folder, identifiers, file_ending, num_channels) -> list:
    images = _case_files(image_folder, identifiers, file_ending, num_channels)
    missing = [i for i in identifiers if not os.path.isfile(os.path.join(label_folder, i + file_ending))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} case(s) have no label file in {label_folder}: "
                                f"{', '.join(m + file_ending for m in missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return [Case(i, images[i], os.path.join(label_folder, i + file_ending)) for i in identifiers]


def validation_cases(raw_dataset: str, preprocessed_dataset: str, fold: str, file_ending: str,
                     num_channels: int) -> list:
    """The fold's validation cases from nnU-Net's ``splits_final.json``, images/labels from the raw dataset."""
    if fold == "all":
        raise ValueError("fold 'all' trains on every case, so it has no validation cases; pass -i IMAGES -l LABELS")
    splits_file = os.path.join(preprocessed_dataset, "splits_final.json")
    if not os.path.isfile(splits_file):
        raise FileNotFoundError(f"{splits_file} does not exist (nnU-Net writes it when the first fold is trained); "
                                f"train a fold first or pass -i IMAGES -l LABELS")
    with open(splits_file) as f:
        splits = json.load(f)
    if not 0 <= int(fold) < len(splits):
        raise ValueError(f"fold {fold} is not in {splits_file}, which has folds 0..{len(splits) - 1}")
    identifiers = list(splits[int(fold)]["val"])
    return _cases(os.path.join(raw_dataset, "imagesTr"), os.path.join(raw_dataset, "labelsTr"), identifiers,
                  file_ending, num_channels)
