"""Image/label file pairs written as an nnU-Net raw dataset, never over anything else.

``write_raw_dataset`` puts ``{case: (image, label)}`` pairs into ``$nnUNet_raw/Dataset<id>_<name>/`` with
nnU-Net's naming: the ``train`` cases in ``imagesTr``/``labelsTr`` (``<case>_0000<ending>``, ``<case><ending>``),
the ``test`` cases in ``imagesTs``/``labelsTs`` (held out). Files are copied unchanged, or resampled to
``spacing`` (SimpleITK: images linear, labels nearest neighbour; None for an axis keeps it) where a CPU-sized copy of large images is
wanted. The folder is written under a temporary name and renamed at the end, so a killed run leaves no half
dataset behind.

``marker`` (any JSON value) is stored in ``dataset.json`` under ``MARKER_KEY``: a dataset at the same path with
the same marker is reused, anything else at that id is refused with a message naming the folder.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Mapping, Sequence

from nnunet_moe.nnunet_paths import datasets_with_id

__all__ = ["write_raw_dataset", "MARKER_KEY"]

MARKER_KEY = "nnunet_moe_demo"  # the key the first datasets were written with: kept so they are still reused


def _resampled(path: str, spacing: Sequence[float], is_label: bool):
    import SimpleITK as sitk

    image = sitk.ReadImage(path)
    old_spacing, old_size = image.GetSpacing(), image.GetSize()
    if len(spacing) != len(old_spacing):
        raise ValueError(f"spacing {list(spacing)} has {len(spacing)} axes, {path} has {len(old_spacing)}")
    spacing = [s if t is None else float(t) for s, t in zip(old_spacing, spacing)]  # None: keep that axis
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(old_size, old_spacing, spacing)]
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), tuple(float(s) for s in spacing),
                         image.GetDirection(), 0, image.GetPixelID())


def _put(source: str, target: str, spacing, is_label: bool) -> None:
    if spacing is None:
        shutil.copyfile(source, target)
    else:
        import SimpleITK as sitk

        sitk.WriteImage(_resampled(source, spacing, is_label), target, True)


def write_raw_dataset(dataset_id: int, dataset_name: str, pairs: Mapping[str, tuple], train: Sequence[str],
                      test: Sequence[str], channel_names: Mapping[str, str], labels: Mapping[str, int],
                      marker, file_ending: str = ".nii.gz", spacing: Sequence[float] | None = None,
                      extra: Mapping | None = None, source_md: str | None = None, what: str = "dataset",
                      other_id_hint: str = "--dataset-id", cases_phrase: str = "cases", log=print) -> str:
    """Write (or reuse) ``$nnUNet_raw/Dataset<id>_<name>``; returns its path. ``extra``: more ``dataset.json``
    keys (name, licence, reference...); ``source_md``: a file copied in as ``SOURCE.md``; ``what`` and
    ``other_id_hint`` word the refusals (``"nnunet-moe demo dataset"``, ``"nnunet-moe demo --dataset-id"``)."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"Dataset id {dataset_id} is outside nnU-Net's range 1..999.")
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise RuntimeError("nnUNet_raw is not set: set it (export nnUNet_raw=/path).")
    missing = [c for c in (*train, *test) if c not in pairs]
    if missing:
        raise ValueError(f"no image/label files for the case(s) {', '.join(missing[:5])}")
    name = f"Dataset{dataset_id:03d}_{dataset_name}"
    folder = os.path.join(raw, name)
    others = [p for p in datasets_with_id(dataset_id) if os.path.basename(p) != name]
    if others:
        raise FileExistsError(
            f"Dataset id {dataset_id} is already used by {others[0]}. nnunet-moe will not touch it: "
            f"choose another id (e.g. `{other_id_hint} {dataset_id + 1}`).")
    if os.path.exists(folder):
        try:
            with open(os.path.join(folder, "dataset.json")) as f:
                same = json.load(f).get(MARKER_KEY) == marker
        except (OSError, ValueError):
            same = False
        if not same:
            raise FileExistsError(
                f"{folder} exists and is not this {what} (its dataset.json differs). Nothing was changed. "
                f"Choose another dataset id or name.")
        log(f"Reusing the {what} at {folder}")
        return folder

    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)  # only our own unfinished write
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(tmp, sub))
    for split, ids in (("Tr", train), ("Ts", test)):
        for case in ids:
            image, label = pairs[case]
            _put(image, os.path.join(tmp, f"images{split}", f"{case}_0000{file_ending}"), spacing, False)
            _put(label, os.path.join(tmp, f"labels{split}", f"{case}{file_ending}"), spacing, True)
    dataset_json = {"channel_names": dict(channel_names), "labels": dict(labels), "numTraining": len(train),
                    "file_ending": file_ending, **dict(extra or {}), MARKER_KEY: marker}
    with open(os.path.join(tmp, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    if source_md is not None:
        shutil.copyfile(source_md, os.path.join(tmp, "SOURCE.md"))
    os.rename(tmp, folder)
    log(f"Wrote {len(train)} training and {len(test)} held-out {cases_phrase} to {folder}")
    return folder
