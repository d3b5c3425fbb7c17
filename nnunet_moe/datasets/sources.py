"""The source datasets of a merge: ``--source``/``--alias`` syntax, finding them in ``$nnUNet_raw``, checks.

Everything here only reads. Each problem is a ValueError/FileNotFoundError naming the source, the
file or the value, and what to do.
"""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field

from nnunet_moe.datasets.metadata import MODALITIES


@dataclass
class Source:
    ref: str  # as the user gave it
    modality: str  # "CT" or "MR"
    dataset_id: int
    name: str  # DatasetXXX_Name
    folder: str
    dataset_json: dict
    labels: dict  # foreground {name: value} of the source's dataset.json
    train: dict  # case -> {"images": [...], "label": path}
    test: dict = field(default_factory=dict)  # case -> {"images": [...], "label": path or None}

    @property
    def key(self) -> str:
        """Prefix of the source's merged case ids and its key in the recorded metadata."""
        return f"d{self.dataset_id:03d}"

    @property
    def label(self) -> str:
        return describe(self.ref, self.name)

    @property
    def num_channels(self) -> int:
        return len(self.dataset_json["channel_names"])


def describe(ref: str, name: str) -> str:
    """How messages name a source: as the user gave it, and its folder."""
    return f"source {name}" if ref == name else f"source {ref} ({name})"


def parse_source_spec(spec: str) -> tuple:
    """``'502:CT'`` or ``'Dataset502_Abdomen:mr'`` -> (``'502'``, ``'CT'``)."""
    ref, sep, modality = spec.rpartition(":")
    if not sep or not ref.strip() or not modality.strip():
        raise ValueError(f"--source {spec!r}: expected DATASET:MODALITY, e.g. --source 502:CT or "
                         f"--source Dataset503_Chaos:MR (DATASET is an id or a folder name in $nnUNet_raw).")
    if modality.strip().upper() not in MODALITIES:
        raise ValueError(f"--source {spec!r}: modality {modality!r} is not accepted; use one of "
                         f"{', '.join(MODALITIES)} (CT gets nnU-Net's CT normalisation from the source's statistics, "
                         f"MR its per-image z-score).")
    return ref.strip(), modality.strip().upper()


def parse_aliases(specs) -> dict:
    """``['spleen=Spleen', ...]`` -> ``{'spleen': 'Spleen'}``: a source label name -> its union name."""
    aliases = {}
    for spec in specs or ():
        name, sep, target = spec.partition("=")
        name, target = name.strip(), target.strip()
        if not sep or not name or not target or "=" in target:
            raise ValueError(f"--alias {spec!r}: expected SOURCE_NAME=UNION_NAME with one '=', e.g. "
                             f"--alias spleen=Spleen (a source's label 'spleen' becomes the union label 'Spleen').")
        if "background" in (name, target):
            raise ValueError(f"--alias {spec!r}: background is always label 0 of every dataset and cannot be "
                             f"aliased; remove this --alias.")
        if name == target:
            raise ValueError(f"--alias {spec!r} maps a name onto itself; remove it.")
        if name in aliases and aliases[name] != target:
            raise ValueError(f"--alias gives '{name}' two union names, '{aliases[name]}' and '{target}'; keep one.")
        aliases[name] = target
    return aliases


def _no_duplicate_keys(path: str):
    def hook(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen and seen[k] != v:
                raise ValueError(f"{path} lists '{k}' twice, as {seen[k]!r} and {v!r} (one name with two meanings; "
                                 f"JSON readers silently keep the last). Fix the file so that '{k}' appears once.")
            seen[k] = v
        return seen
    return hook


def read_dataset_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f, object_pairs_hook=_no_duplicate_keys(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: every nnU-Net raw dataset needs a dataset.json.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix it.") from None


def find_in_raw(ref: str, raw: str) -> str:
    """Folder name ``DatasetXXX_Name`` in ``raw`` for an id (``'502'``), a folder name or the name after it."""
    if not os.path.isdir(raw):
        raise FileNotFoundError(f"nnUNet_raw={raw} is not a folder; set nnUNet_raw to the folder that holds the "
                                f"source datasets.")
    names = sorted(d for d in os.listdir(raw)
                   if re.fullmatch(r"Dataset\d{3}_.+", d) and os.path.isdir(os.path.join(raw, d)))
    if ref.isdigit():
        hits = [d for d in names if d.startswith(f"Dataset{int(ref):03d}_")]
    else:
        hits = [d for d in names if d == ref] or [d for d in names if d.partition("_")[2] == ref]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        have = ", ".join(names) if names else "none"
        raise FileNotFoundError(f"Source dataset {ref!r} is not in $nnUNet_raw ({raw}); the datasets there are: "
                                f"{have}. Give one of them by id or name, or set nnUNet_raw to the folder that "
                                f"holds it.")
    raise ValueError(f"Source dataset {ref!r} matches several folders in {raw}: {', '.join(hits)}; give the full "
                     f"folder name instead.")


def _check_labels(src_label: str, labels, path: str) -> dict:
    if not isinstance(labels, dict) or labels.get("background") != 0:
        raise ValueError(f"{src_label}: {path} needs \"labels\" with \"background\": 0 (nnU-Net's format).")
    fg = {}
    for name, value in labels.items():
        if name == "background":
            continue
        if name == "ignore":
            raise ValueError(f"{src_label} has an 'ignore' label; merge-datasets does not merge datasets with "
                             f"ignore labels yet (its voxels would need a union-wide ignore value). Remove it from "
                             f"the source's labels or merge without this source.")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{src_label}: label '{name}' has value {value!r}; merge-datasets needs one integer value "
                             f"per label (region-based labels, lists of values, are not supported).")
        fg[name] = value
    if not fg:
        raise ValueError(f"{src_label} has no labels besides background ({path}); a merge needs annotated sources. "
                         f"Add its labels, or leave it out.")
    return fg


def _cases_in(folder: str, split: str, file_ending: str) -> dict:
    """``images<split>``/``labels<split>`` cases as nnU-Net lists them (its identifier and file-name rules,
    without its 12-process pool); a missing label file is ``None``."""
    from nnunetv2.utilities.utils import create_paths_fn, get_identifiers_from_splitted_dataset_folder

    images_dir = os.path.join(folder, f"images{split}")
    if not os.path.isdir(images_dir):
        return {}
    files = sorted(os.listdir(images_dir))
    out = {}
    for case in (str(i) for i in get_identifiers_from_splitted_dataset_folder(images_dir, file_ending)):
        label = os.path.join(folder, f"labels{split}", case + file_ending)
        out[case] = {"images": create_paths_fn(images_dir, files, file_ending, case),
                     "label": label if os.path.isfile(label) else None}
    return out


def load_source(spec: str, raw: str) -> Source:
    """Parse ``spec``, find the dataset and check what a merge needs from it (reads only)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    ref, modality = parse_source_spec(spec)
    name = find_in_raw(ref, raw)
    folder = os.path.join(raw, name)
    dj_path = os.path.join(folder, "dataset.json")
    dj = read_dataset_json(dj_path)
    src_label = describe(ref, name)
    for key in ("channel_names", "labels", "file_ending"):
        if key not in dj:
            raise ValueError(f"{src_label}: {dj_path} has no \"{key}\"; it is not a valid nnU-Net v2 dataset.json.")
    labels = _check_labels(src_label, dj["labels"], dj_path)
    if "dataset" not in dj and not os.path.isdir(os.path.join(folder, "labelsTr")):
        raise ValueError(f"{src_label} has no labelsTr folder; a merge needs annotated training cases.")
    if "dataset" in dj:  # dataset.json lists the files itself
        train = get_filenames_of_train_images_and_targets(folder, copy.deepcopy(dj))
    else:
        train = _cases_in(folder, "Tr", dj["file_ending"])
    if not train:
        raise ValueError(f"{src_label} has no training cases in {os.path.join(folder, 'imagesTr')}.")
    test = _cases_in(folder, "Ts", dj["file_ending"])
    n_ch = len(dj["channel_names"])
    for case, files, training in [(c, f, True) for c, f in train.items()] + [(c, f, False) for c, f in test.items()]:
        if len(files["images"]) != n_ch:
            raise ValueError(f"{src_label}: case {case} has {len(files['images'])} image files, dataset.json names "
                             f"{n_ch} channels; fix the source (nnUNetv2_plan_and_preprocess "
                             f"--verify_dataset_integrity reports such problems).")
        if training and (files["label"] is None or not os.path.isfile(files["label"])):
            missing = files["label"] or os.path.join(folder, "labelsTr", case + dj["file_ending"])
            raise FileNotFoundError(f"{src_label}: case {case} has no label file {missing}; every training "
                                    f"case of a merged source must be annotated.")
    first = next(iter(train.values()))["images"][0]
    rw = determine_reader_writer_from_dataset_json(dj, first, verbose=False)
    if rw is not SimpleITKIO:
        formats = ", ".join(SimpleITKIO.supported_file_endings)
        raise ValueError(f"{src_label}: its files ({dj['file_ending']}) are read by nnU-Net's {rw.__name__}; "
                         f"merge-datasets reads and writes SimpleITK formats only ({formats}). Convert the source "
                         f"to .nii.gz first.")
    return Source(ref, modality, int(name[7:10]), name, folder, dj, labels, train, test)
