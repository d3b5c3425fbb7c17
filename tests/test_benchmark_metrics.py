"""case_metrics / aggregate on small synthetic masks whose Dice, HD95 and NSD are worked out by hand."""
import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance

from nnunet_moe.benchmark.metrics import aggregate, case_metrics, case_metrics_from_files, image_diagonal_mm

# anisotropic on purpose: 1.5 mm along axis 0 (the shift axis), other values elsewhere
SPACING_3D = (1.5, 0.8, 2.5)


def shifted_cubes():
    """Reference cube [2:8]^3 (6^3 = 216 voxels) and the same cube shifted by 2 voxels along axis 0."""
    reference = np.zeros((12, 12, 12), dtype=np.uint8)
    reference[2:8, 2:8, 2:8] = 1
    prediction = np.zeros_like(reference)
    prediction[4:10, 2:8, 2:8] = 1
    return prediction, reference


def test_shifted_cube_dice_hd95_nsd():
    prediction, reference = shifted_cubes()
    result = case_metrics(prediction, reference, [1], SPACING_3D, nsd_tolerance_mm=3.0)[1]
    # overlap is x in 4..7: 4*6*6 = 144 voxels; Dice = 2*144 / (216 + 216)
    assert result["dice"] == pytest.approx(288 / 432)
    # The far face of each cube (x=9 of the prediction, x=2 of the reference, 36 of the 152
    # surface voxels) lies 2 voxels * 1.5 mm = 3.0 mm from the other surface, and no surface
    # voxel is farther. 36/152 > 5%, so the 95th percentile in both directions is the maximum.
    assert result["hd95"] == pytest.approx(3.0)
    # tolerance 3.0 mm includes every distance (MONAI counts d <= tolerance)
    assert result["nsd"] == pytest.approx(1.0)


def test_shifted_cube_nsd_fraction_at_smaller_tolerance():
    prediction, reference = shifted_cubes()
    result = case_metrics(prediction, reference, [1], SPACING_3D, nsd_tolerance_mm=1.5)[1]
    # Prediction surface (152 voxels) -> reference surface, distances <= 1.5 mm:
    #   side ring (y or z on the border) at x=4..7 lies on the reference surface: 4*20 = 80, d = 0
    #   side ring at x=8: nearest is the reference face x=7, d = 1.5: 20
    #   side ring and face at x=9: d = 3.0: none
    #   face x=4, interior y,z in 3..6: d = min(3.0 (face x=2), 0.8*min(y-2, 7-y), 2.5*min(z-2, 7-z)),
    #     <= 1.5 only for y in {3, 6} (0.8 mm): 2*4 = 8
    # -> 108 of 152; the reference -> prediction direction is the mirror image: 108 of 152.
    assert result["nsd"] == pytest.approx(216 / 304)


def test_parallel_planes_anisotropic_spacing_hd95_and_nsd_threshold():
    reference = np.zeros((8, 10, 10), dtype=np.int64)
    reference[3] = 1
    prediction = np.zeros_like(reference)
    prediction[5] = 1
    spacing = (1.5, 0.7, 0.4)
    # every voxel of a one-voxel-thick plane is a surface voxel; each lies 2 * 1.5 = 3.0 mm from
    # the other plane, so every percentile of the distances is 3.0
    inside = case_metrics(prediction, reference, [1], spacing, nsd_tolerance_mm=3.0)[1]
    outside = case_metrics(prediction, reference, [1], spacing, nsd_tolerance_mm=2.99)[1]
    assert inside == pytest.approx({"dice": 0.0, "hd95": 3.0, "nsd": 1.0})
    assert outside == pytest.approx({"dice": 0.0, "hd95": 3.0, "nsd": 0.0})
    # spacing follows the array axes: reversed spacing puts 0.4 mm on the shift axis -> 0.8 mm
    reversed_spacing = case_metrics(prediction, reference, [1], spacing[::-1])[1]
    assert reversed_spacing["hd95"] == pytest.approx(0.8)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_hd95_is_a_percentile_not_the_maximum():
    reference = np.zeros((10, 10, 10), dtype=np.int64)
    reference[3] = 1
    prediction = reference.copy()
    prediction[9, 9, 9] = 1  # one stray voxel 6 slices away: an outlier among 101 surface voxels
    result = case_metrics(prediction, reference, [1], (1.0, 1.0, 1.0))[1]
    assert result["dice"] == pytest.approx(200 / 201)
    # distances prediction -> reference: 100 zeros and one outlier; torch.quantile(0.95) over 101
    # sorted values takes index 95, a zero; reference -> prediction: all zeros
    assert result["hd95"] == pytest.approx(0.0)
    # the plain Hausdorff distance (maximum) of the same masks is the outlier's distance
    one_hot = [torch.stack([torch.from_numpy(m == 0), torch.from_numpy(m == 1)])[None].float()
               for m in (prediction, reference)]
    # (its nearest reference voxel is (3, 9, 9), 6 mm away)
    assert compute_hausdorff_distance(*one_hot).item() == pytest.approx(6.0)
    # NSD: 1 of 201 surface voxels is farther than 1 mm
    assert result["nsd"] == pytest.approx(200 / 201)


def test_2d_shifted_square():
    reference = np.zeros((8, 8), dtype=np.int32)
    reference[1:5, 2:6] = 1
    prediction = np.zeros_like(reference)
    prediction[2:6, 2:6] = 1
    result = case_metrics(prediction, reference, [1], (1.0, 1.0), nsd_tolerance_mm=0.5)[1]
    # overlap 3*4 = 12 of 16 + 16
    assert result["dice"] == pytest.approx(24 / 32)
    # each 12-pixel ring has 6 pixels on the other ring (d = 0) and 6 at d = 1: HD95 = 1, NSD(0.5) = 12/24
    assert result["hd95"] == pytest.approx(1.0)
    assert result["nsd"] == pytest.approx(0.5)
    # anisotropic 2D spacing: the shift axis 0 at 2.0 mm; HD95 becomes 2.0 (ring pixels whose
    # nearest other-ring pixel is along axis 1 are 0 or 0.5 mm away, the rest 2.0 mm)
    assert case_metrics(prediction, reference, [1], (2.0, 0.5))[1]["hd95"] == pytest.approx(2.0)


def test_empty_prediction_and_empty_reference():
    prediction, reference = shifted_cubes()
    empty = np.zeros_like(reference)
    diagonal = math.sqrt((11 * 1.5) ** 2 + (11 * 0.8) ** 2 + (11 * 2.5) ** 2)
    assert image_diagonal_mm(reference.shape, SPACING_3D) == pytest.approx(diagonal)
    missed = case_metrics(empty, reference, [1], SPACING_3D)[1]
    spurious = case_metrics(prediction, empty, [1], SPACING_3D)[1]
    for result in (missed, spurious):
        assert result == pytest.approx({"dice": 0.0, "hd95": diagonal, "nsd": 0.0})


def test_both_empty_conventions():
    prediction, reference = shifted_cubes()
    # label 2 is in neither map
    perfect = case_metrics(prediction, reference, [1, 2], SPACING_3D)
    assert perfect[2] == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    assert perfect[1]["dice"] == pytest.approx(2 / 3)
    as_nan = case_metrics(prediction, reference, [2], SPACING_3D, both_empty="nan")[2]
    assert all(math.isnan(v) for v in as_nan.values())


def test_metric_subset_computes_only_what_is_asked():
    prediction, reference = shifted_cubes()
    empty = np.zeros_like(reference)
    # labels: 1 overlapping, 2 absent from both; and a case where the prediction is empty
    dice_only = case_metrics(prediction, reference, [1, 2], SPACING_3D, both_empty="nan", metrics=("dice",))
    assert list(dice_only[1]) == ["dice"] and dice_only[1]["dice"] == pytest.approx(288 / 432)
    assert list(dice_only[2]) == ["dice"] and math.isnan(dice_only[2]["dice"])
    assert case_metrics(empty, reference, [1], SPACING_3D, metrics=("dice",)) == {1: {"dice": 0.0}}
    hd_only = case_metrics(prediction, reference, [1], SPACING_3D, metrics=("hd95",))[1]
    assert hd_only == pytest.approx({"hd95": 3.0})
    for bad in ((), ("dice", "jaccard")):
        with pytest.raises(ValueError, match="subset"):
            case_metrics(prediction, reference, [1], SPACING_3D, metrics=bad)


def test_regions_and_per_label_tolerances():
    reference = np.zeros((6, 6), dtype=np.int64)
    reference[1:3, 1:5] = 1
    reference[3:5, 1:5] = 2
    prediction = reference.copy()
    prediction[3:5, 1:5] = 1  # label 2 predicted as 1: region (1, 2) is still perfect
    result = case_metrics(prediction, reference, [1, 2, (1, 2)], (1.0, 1.0), nsd_tolerance_mm=[0.0, 1.0, 0.0])
    assert result[1]["dice"] == pytest.approx(2 * 8 / (16 + 8))
    assert result[2] == pytest.approx({"dice": 0.0, "hd95": image_diagonal_mm((6, 6), (1, 1)), "nsd": 0.0})
    assert result[(1, 2)] == pytest.approx({"dice": 1.0, "hd95": 0.0, "nsd": 1.0})
    assert list(result) == [1, 2, (1, 2)]


def test_float_label_maps_as_nnunet_reads_them():
    prediction, reference = shifted_cubes()
    result = case_metrics(prediction.astype(np.float32), reference.astype(np.float32), [1], SPACING_3D)
    assert result[1]["dice"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="non-integer"):
        case_metrics(prediction * 0.5, reference, [1], SPACING_3D)


def test_errors_name_the_problem():
    prediction, reference = shifted_cubes()
    with pytest.raises(ValueError, match=r"\(12, 12, 12\).*\(12, 12, 11\)"):
        case_metrics(prediction, reference[:, :, :11], [1], SPACING_3D)
    with pytest.raises(ValueError, match="spacing .* 2 entries .* 3D"):
        case_metrics(prediction, reference, [1], (1.0, 1.0))
    with pytest.raises(ValueError, match="nsd_tolerance_mm has 1 entries"):
        case_metrics(prediction, reference, [1, 2], SPACING_3D, nsd_tolerance_mm=[1.0])
    with pytest.raises(ValueError, match="finite and > 0"):
        case_metrics(prediction, reference, [1], (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="int or a non-empty tuple"):
        case_metrics(prediction, reference, ["liver"], SPACING_3D)
    with pytest.raises(ValueError, match="both_empty"):
        case_metrics(prediction, reference, [1], SPACING_3D, both_empty="zero")


def test_aggregate_nan_aware_means_and_foreground_mean():
    cases = [
        {0: {"dice": 0.9, "hd95": 1.0, "nsd": 0.9}, 1: {"dice": 0.8, "hd95": 2.0, "nsd": 0.7},
         2: {"dice": 0.4, "hd95": math.nan, "nsd": 0.5}},
        {0: {"dice": 0.7, "hd95": 3.0, "nsd": 0.7}, 1: {"dice": 0.6, "hd95": 4.0, "nsd": 0.5},
         2: {"dice": 0.2, "hd95": 6.0, "nsd": 0.3}},
    ]
    result = aggregate(cases)
    assert result["n_cases"] == 2
    assert result["per_label"][1] == pytest.approx({"dice": 0.7, "hd95": 3.0, "nsd": 0.6})
    assert result["per_label"][2] == pytest.approx({"dice": 0.3, "hd95": 6.0, "nsd": 0.4})
    assert result["nan_cases"][2] == {"dice": 0, "hd95": 1, "nsd": 0}
    assert result["nan_cases"][1] == {"dice": 0, "hd95": 0, "nsd": 0}
    # label 0 is left out of the foreground mean
    assert result["foreground_mean"] == pytest.approx({"dice": 0.5, "hd95": 4.5, "nsd": 0.5})
    with pytest.raises(ValueError, match="same labels"):
        aggregate([cases[0], {1: cases[1][1]}])
    with pytest.raises(ValueError, match="at least one case"):
        aggregate([])


def test_aggregate_all_nan_label_gives_nan():
    result = aggregate([{3: {"dice": math.nan, "hd95": math.nan, "nsd": math.nan}}] * 2)
    assert math.isnan(result["per_label"][3]["dice"])
    assert result["nan_cases"][3]["hd95"] == 2
    assert math.isnan(result["foreground_mean"]["nsd"])


def test_case_metrics_from_nnunet_files_3d_and_2d(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    prediction, reference = shifted_cubes()
    for name, array in (("ref", reference), ("pred", prediction)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(SPACING_3D[::-1])  # SimpleITK spacing is x, y, z; the array is z, y, x
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    result = case_metrics_from_files(str(tmp_path / "ref.nii.gz"), str(tmp_path / "pred.nii.gz"), [1],
                                     nsd_tolerance_mm=1.5)
    assert result[1] == pytest.approx({"dice": 2 / 3, "hd95": 3.0, "nsd": 216 / 304})
    # 2D: nnU-Net reads it as (1, 1, H, W); it must be scored as a 2D image (HD95 1.0, not 0)
    square_ref = np.zeros((8, 8), dtype=np.uint8)
    square_ref[1:5, 2:6] = 1
    square_pred = np.zeros_like(square_ref)
    square_pred[2:6, 2:6] = 1
    for name, array in (("ref2d", square_ref), ("pred2d", square_pred)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / f"{name}.nii.gz"))
    result_2d = case_metrics_from_files(str(tmp_path / "ref2d.nii.gz"), str(tmp_path / "pred2d.nii.gz"), [1],
                                        nsd_tolerance_mm=0.5)
    assert result_2d[1] == pytest.approx({"dice": 0.75, "hd95": 1.0, "nsd": 0.5})


def test_real_hippocampus_label_against_independent_computation():
    """Bundled real label map vs. itself moved by one voxel: Dice as nnU-Net computes it, HD95 and
    NSD from a direct scipy computation (erosion edges, KD-tree distances, per-direction quantile)."""
    from pathlib import Path

    sitk = pytest.importorskip("SimpleITK")
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn
    from scipy.ndimage import binary_erosion
    from scipy.spatial import cKDTree

    import nnunet_moe

    label_file = Path(nnunet_moe.__file__).parent / "data" / "hippocampus" / "labels" / "hippocampus_001.nii.gz"
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file))).astype(np.int64)
    prediction = np.roll(reference, 1, axis=0)
    prediction[:, 25:28] = 0  # and cut a gap through both labels, so the distances are not all equal
    result = case_metrics(prediction, reference, [1, 2], SPACING_3D, nsd_tolerance_mm=1.0)
    for label in (1, 2):
        pred_mask, ref_mask = prediction == label, reference == label
        tp, fp, fn, _ = compute_tp_fp_fn_tn(ref_mask, pred_mask)
        assert result[label]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-6)
        edges = [np.argwhere(m & ~binary_erosion(m)) * np.array(SPACING_3D) for m in (pred_mask, ref_mask)]
        pred_to_ref = cKDTree(edges[1]).query(edges[0])[0]
        ref_to_pred = cKDTree(edges[0]).query(edges[1])[0]
        expected_hd95 = max(np.quantile(pred_to_ref, 0.95), np.quantile(ref_to_pred, 0.95))
        assert result[label]["hd95"] == pytest.approx(expected_hd95, rel=1e-5)
        within = (pred_to_ref <= 1.0).sum() + (ref_to_pred <= 1.0).sum()
        assert result[label]["nsd"] == pytest.approx(within / (len(pred_to_ref) + len(ref_to_pred)), rel=1e-6)
        # the perturbation is large enough to matter (guards against a test that cannot fail)
        assert 0.5 < result[label]["nsd"] < 0.9 and result[label]["hd95"] >= 1.5
