"""Each source's own nnU-Net normalisation, applied before the merge (and again before prediction).

nnU-Net picks a normalisation per channel *name* (``get_normalization_scheme``): ``CT`` -> CTNormalization
(clip to the dataset's foreground 0.5/99.5 percentiles, subtract the foreground mean, divide by its std),
anything else -> ZScoreNormalization (per image). One merged channel cannot be both, so the merged dataset
has channels named ``noNorm`` (nnU-Net's NoNormalization, matched case-insensitively) and every case is
written already normalised as nnU-Net would normalise it in its own source dataset:

- CT: the statistics are computed exactly as nnU-Net 2.8's dataset fingerprint computes them, with its own
  functions: per case ``crop_to_nonzero`` then ``collect_foreground_intensities`` (``FOREGROUND_SAMPLES_TOTAL``
  // number of cases voxels per case, drawn with replacement, seed 1234), then mean/std/percentiles of all
  samples of the source. So they equal ``foreground_intensity_properties_per_channel`` of the source's
  ``dataset_fingerprint.json``.
- MR: per-image z-score; ``use_mask_for_norm`` as nnU-Net's planner decides it for the source (median
  relative size after cropping to the nonzero region < 3/4).

As in nnU-Net, an image is first cropped to the bounding box of its (hole-filled) nonzero region and
normalised there with nnU-Net's own normalisation classes; the voxels outside that box are written as 0, so
that nnU-Net crops the merged case to the same box. Simplifications: with ``use_mask_for_norm`` the mask is
the image's nonzero region only (nnU-Net's training preprocessing also counts labelled voxels outside it,
its prediction does not), and nnU-Net's axis transpose is not applied (it reorders the float32 sums only).
"""
from __future__ import annotations

import numpy as np

# nnU-Net 2.8: DatasetFingerprintExtractor.num_foreground_voxels_for_intensitystats (per dataset)
FOREGROUND_SAMPLES_TOTAL = 10e7
SCHEMES = {"CT": "CTNormalization", "MR": "ZScoreNormalization"}


def samples_per_case(num_cases: int) -> int:
    return int(FOREGROUND_SAMPLES_TOTAL // num_cases)


def crop_box(image: np.ndarray) -> tuple:
    """``(slicer, nonzero mask inside the box, relative size of the box)`` as nnU-Net's ``crop_to_nonzero``."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    _, nonzero, bbox = crop_to_nonzero(image)
    slicer = tuple(slice(lo, hi) for lo, hi in bbox)
    return slicer, nonzero[0] >= 0, float(np.prod(nonzero.shape[1:]) / np.prod(image.shape[1:]))


def foreground_samples(image: np.ndarray, seg: np.ndarray, num_samples: int) -> list:
    """One case's foreground intensity samples per channel, drawn as nnU-Net's fingerprint draws them."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    data, seg_cropped, _ = crop_to_nonzero(image, seg.copy())
    samples, _ = DatasetFingerprintExtractor.collect_foreground_intensities(seg_cropped, data, num_samples=num_samples)
    return samples


def ct_parameters(samples: list, where: str) -> dict:
    """``samples``: per case, per channel (as ``foreground_samples``). nnU-Net's fingerprint statistics."""
    channels = []
    for c in range(len(samples[0])):
        values = np.concatenate([case[c] for case in samples])
        if values.size == 0:
            raise ValueError(f"{where}: no labelled voxels in any training case, so nnU-Net's CT statistics cannot "
                             f"be computed; give it as MR (per-image z-score) or fix its labels.")
        p005, median, p995 = np.percentile(values, (0.5, 50.0, 99.5))
        channels.append({"mean": float(np.mean(values)), "median": float(median), "std": float(np.std(values)),
                         "min": float(np.min(values)), "max": float(np.max(values)),
                         "percentile_99_5": float(p995), "percentile_00_5": float(p005)})
    return {"scheme": SCHEMES["CT"], "channels": channels}


def mr_parameters(relative_sizes: list) -> dict:
    median = float(np.median(relative_sizes))
    # nnU-Net's ExperimentPlanner.determine_normalization_scheme_and_whether_mask_is_used_for_norm
    return {"scheme": SCHEMES["MR"], "use_mask_for_norm": bool(median < 3 / 4.),
            "median_relative_size_after_cropping": median}


def normalise_for_prediction(image: np.ndarray, modality: str, params: dict) -> np.ndarray:
    """``image`` (channels first, float, as nnU-Net's reader returns it: ``(c, z, y, x)``) normalised the way the
    merged dataset's cases of that source were: pass the source's ``modality`` and ``normalisation`` record
    from the merged ``dataset.json`` (``nnunet_moe_merge.sources[<key>]``). Returns a new float32 array."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization, \
        ZScoreNormalization

    expected = SCHEMES.get(modality)
    if expected is None:
        raise ValueError(f"modality {modality!r}: use one of {', '.join(SCHEMES)}.")
    if not isinstance(params, dict) or params.get("scheme") != expected:
        got = params.get("scheme") if isinstance(params, dict) else params
        raise ValueError(f"modality {modality} needs {expected} parameters, got {got!r}: pass the 'normalisation' "
                         f"record of that modality's source from the merged dataset.json.")
    if image.ndim not in (3, 4):
        raise ValueError(f"image of shape {image.shape}: expected channels first, (c, x, y) or (c, x, y, z).")
    if modality == "CT" and len(params["channels"]) != image.shape[0]:
        raise ValueError(f"image has {image.shape[0]} channels, the CT parameters {len(params['channels'])}.")
    data = image.astype(np.float32)
    slicer, nonzero, _ = crop_box(data)
    out = np.zeros_like(data)
    for c in range(data.shape[0]):
        crop = data[c][slicer].copy()
        if modality == "CT":
            norm = CTNormalization(use_mask_for_norm=False, intensityproperties=params["channels"][c])
            out[c][slicer] = norm.run(crop)
        else:
            norm = ZScoreNormalization(use_mask_for_norm=params["use_mask_for_norm"], intensityproperties={})
            out[c][slicer] = norm.run(crop, np.where(nonzero, 0, -1).astype(np.int8))
    return out


def write_image_channels(data: np.ndarray, properties: dict, paths: list) -> None:
    """Write a (c, ...) float32 array as one file per channel with the geometry nnU-Net's SimpleITKIO read."""
    import SimpleITK as sitk

    sitk_props = properties["sitk_stuff"]
    for c, path in enumerate(paths):
        arr = data[c] if len(sitk_props["spacing"]) == 3 else data[c][0]  # 2D files are read as (1, 1, x, y)
        img = sitk.GetImageFromArray(arr.astype(np.float32, copy=False))
        img.SetSpacing(sitk_props["spacing"])
        img.SetOrigin(sitk_props["origin"])
        img.SetDirection(sitk_props["direction"])
        sitk.WriteImage(img, path, True)
