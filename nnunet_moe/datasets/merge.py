"""``nnunet-moe merge-datasets``: several nnU-Net raw datasets (one modality each) as one raw dataset.

What it writes, into ``$nnUNet_raw/Dataset<out>_<name>/``:

- ``imagesTr``/``labelsTr`` (and ``imagesTs``/``labelsTs`` where a source has them): case ids prefixed by
  the source (``d502_<case>``), nnU-Net's file naming, ``.nii.gz``. Images are written pre-normalised as
  nnU-Net would normalise them in their own source dataset, under channels named ``noNorm``
  (``normalisation.py``); labels are relabelled into the union label set (``labels.py``).
- ``dataset.json`` with the union ``labels`` and the per-source/per-case record under ``nnunet_moe_merge``
  (``metadata.py``), which nnU-Net's planning and training carry along unchanged.
- ``splits_final.json``: five folds stratified by source (``splits.py``), copied by nnU-Net's planner.

Every check (arguments, sources, labels, every label file's values, image/label shapes) runs before
anything is written; the dataset is written into a hidden temporary folder and renamed at the end, so a
refusal or a crash leaves nothing at the target. The source datasets are only read.
"""
from __future__ import annotations

import json
import os
import re
import shutil

from nnunet_moe.datasets.labels import case_only_differences, relabel, union_labels
from nnunet_moe.datasets.metadata import FORMAT_VERSION, MERGE_KEY
from nnunet_moe.datasets.normalisation import SCHEMES, crop_box, ct_parameters, foreground_samples, \
    mr_parameters, normalise_for_prediction, samples_per_case, write_image_channels
from nnunet_moe.datasets.sources import load_source, parse_aliases
from nnunet_moe.datasets.splits import stratified_splits
from nnunet_moe.nnunet_paths import datasets_with_id

FILE_ENDING = ".nii.gz"
CHANNEL_NAME = "noNorm"  # nnU-Net's NoNormalization ('nonorm' after casefold)


def _check_target(out_id, name: str) -> str:
    if isinstance(out_id, bool) or not isinstance(out_id, int) or not 1 <= out_id <= 999:
        raise ValueError(f"--out {out_id!r}: a dataset id is an integer in nnU-Net's range 1..999.")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        raise ValueError(f"--name {name!r}: use letters, digits, '_', '-' or '.' (it becomes the folder "
                         f"Dataset{out_id:03d}_<name>).")
    used = datasets_with_id(out_id)
    if used:
        raise FileExistsError(f"Dataset id {out_id} is already used by {sorted(used)[0]}; merge-datasets never "
                              f"writes over an existing dataset. Choose a free id with --out.")
    return f"Dataset{out_id:03d}_{name}"


def _check_sources(sources: list) -> None:
    if len(sources) < 2:
        raise ValueError("A merge needs at least two --source DATASET:MODALITY.")
    seen, keys = {}, {}
    for s in sources:
        if s.name in seen:
            raise ValueError(f"{s.name} is given twice (--source {seen[s.name]} and --source {s.ref}); give each "
                             f"source once.")
        if s.key in keys:
            raise ValueError(f"{keys[s.key]} and {s.name} share the dataset id {s.dataset_id}, and the merged case "
                             f"ids are prefixed by it ({s.key}_); nnU-Net needs unique ids: renumber one of them.")
        seen[s.name], keys[s.key] = s.ref, s.name
    counts = {s.label: s.num_channels for s in sources}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise ValueError(f"The sources have different numbers of image channels ({listing}); a merged dataset has "
                         f"one channel count. Merge only sources with the same channels.")


def _analyse(source, value_map: dict, log) -> dict:
    """Read every case once: label values and shapes are checked, the normalisation parameters computed."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    rw = SimpleITKIO()
    samples, sizes = [], []
    n = samples_per_case(len(source.train))
    for case, files in list(source.train.items()) + list(source.test.items()):
        if files["label"] is None:  # an unlabelled test case: nothing to check before writing
            continue
        image, _ = rw.read_images(files["images"])
        seg, _ = rw.read_seg(files["label"])
        if seg.shape[1:] != image.shape[1:]:
            raise ValueError(f"{source.label}: case {case} has image shape {image.shape[1:]} but label shape "
                             f"{seg.shape[1:]} ({files['label']}); fix the source.")
        relabel(seg, value_map, f"{source.label}: {files['label']}")  # refuses values dataset.json does not list
        if case not in source.train:
            continue
        if source.modality == "CT":
            samples.append(foreground_samples(image, seg, n))
        else:
            sizes.append(crop_box(image)[2])
    log(f"  checked {source.label}: {len(source.train)} training, {len(source.test)} test cases")
    return ct_parameters(samples, source.label) if source.modality == "CT" else mr_parameters(sizes)


def _write_case(rw, source, files: dict, params: dict, value_map: dict, image_paths: list, label_path) -> None:
    image, props = rw.read_images(files["images"])
    write_image_channels(normalise_for_prediction(image, source.modality, params), props, image_paths)
    if label_path is not None:
        seg, seg_props = rw.read_seg(files["label"])
        rw.write_seg(relabel(seg, value_map, files["label"])[0], label_path, seg_props)


def _notes(sources: list, union: dict, log) -> None:
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme

    for a, b in case_only_differences(union):
        log(f"  note: union labels '{a}' and '{b}' differ only in case; if they are one structure, add "
            f"--alias {b}={a}.")
    for s in sources:
        own = {get_normalization_scheme(n).__name__ for n in s.dataset_json["channel_names"].values()}
        wanted = SCHEMES[s.modality]
        if own != {wanted}:
            log(f"  note: {s.label} is given as {s.modality}; nnU-Net alone would normalise its channels "
                f"{dict(s.dataset_json['channel_names'])} with {', '.join(sorted(own))}. It is merged with "
                f"{wanted}, as --source says.")


def merge_datasets(out_id: int, source_specs, alias_specs=(), name: str = "Merged", log=print) -> str:
    """Merge the sources (``['502:CT', '503:MR']``) into ``$nnUNet_raw/Dataset<out_id>_<name>``; returns its path."""
    from nnunet_moe.nnunet_paths import require_nnunet_paths
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    raw = require_nnunet_paths("nnunet-moe merge-datasets")["nnUNet_raw"]
    target = _check_target(out_id, name)
    aliases = parse_aliases(alias_specs)
    sources = [load_source(spec, raw) for spec in source_specs]
    _check_sources(sources)
    union, value_maps, name_maps = union_labels(sources, aliases)
    splits = stratified_splits({s.key: [f"{s.key}_{c}" for c in s.train] for s in sources})
    _notes(sources, union, log)
    log(f"Merging {', '.join(s.name + ' (' + s.modality + ')' for s in sources)} into {target}")
    params = {s.key: _analyse(s, value_maps[s.key], log) for s in sources}

    final = os.path.join(raw, target)
    tmp = os.path.join(raw, f".{target}.nnunet-moe-partial")  # hidden from nnU-Net's DatasetXXX_ lookup
    shutil.rmtree(tmp, ignore_errors=True)  # only our own interrupted write
    try:
        record = _write(tmp, sources, params, value_maps, union, SimpleITKIO(), log)
        meta = {"format_version": FORMAT_VERSION, "sources": {}, **record}
        for s in sources:
            meta["sources"][s.key] = {
                "dataset": s.name, "modality": s.modality, "channel_names": s.dataset_json["channel_names"],
                "labels": name_maps[s.key],
                "label_values": {str(k): v for k, v in sorted(value_maps[s.key].items()) if k != 0},
                "normalisation": params[s.key], "num_training": len(s.train), "num_test": len(s.test)}
        dataset_json = {
            "channel_names": {str(c): CHANNEL_NAME for c in range(sources[0].num_channels)},
            "labels": union,
            "numTraining": len(record["cases"]),
            "file_ending": FILE_ENDING,
            "name": target,
            "description": "Merged by `nnunet-moe merge-datasets` from " + ", ".join(
                f"{s.name} ({s.modality})" for s in sources) + "; images pre-normalised per source, see "
                f"{MERGE_KEY}.sources.*.normalisation.",
            MERGE_KEY: meta,
        }
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(dataset_json, f, indent=2)
        with open(os.path.join(tmp, "splits_final.json"), "w") as f:
            json.dump(splits, f, indent=2)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"Wrote {final}: {len(record['cases'])} training, {len(record['test_cases'])} test cases")
    log("Union labels: " + ", ".join(f"{k}={v}" for k, v in union.items()))
    log(f"Next: nnUNetv2_plan_and_preprocess -d {out_id} (it copies dataset.json and splits_final.json into "
        f"nnUNet_preprocessed).")
    return final


def _write(tmp: str, sources: list, params: dict, value_maps: dict, union: dict, rw, log) -> dict:
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(tmp, sub))
    record = {"cases": {}, "test_cases": {}}
    for s in sources:
        annotated = set(value_maps[s.key].values()) - {0}
        union_names = [n for n, v in union.items() if v in annotated]  # in union order
        for split, cases, key in (("Tr", s.train, "cases"), ("Ts", s.test, "test_cases")):
            for case, files in cases.items():
                cid = f"{s.key}_{case}"
                images = [os.path.join(tmp, f"images{split}", f"{cid}_{c:04d}{FILE_ENDING}")
                          for c in range(len(files["images"]))]
                label = None if files["label"] is None else os.path.join(tmp, f"labels{split}", cid + FILE_ENDING)
                for path in images + ([label] if label else []):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                _write_case(rw, s, files, params[s.key], value_maps[s.key], images, label)
                record[key][cid] = {"source": s.key, "modality": s.modality, "labels": union_names}
        log(f"  wrote {s.label}")
    return record
