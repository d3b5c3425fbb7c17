"""``nnunet-moe merge-datasets``: union labels, relabelling, metadata, splits, normalisation, refusals.

Two tiny raw datasets: 503 = six real hippocampus MRI cases (+2 test cases) from the bundled data, and
502 = six synthetic 'CT' cases whose labels (bone 1, anterior 2, Posterior 5) share 'Posterior' with the
hippocampus (Anterior 1, Posterior 2) and match 'Anterior' only through --alias anterior=Anterior.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import nnunet_cmd, run

from nnunet_moe.cli import main
from nnunet_moe.datasets.merge import merge_datasets
from nnunet_moe.datasets.metadata import MERGE_KEY, case_record, merge_metadata
from nnunet_moe.datasets.normalisation import normalise_for_prediction
from nnunet_moe.datasets.splits import stratified_splits

CT_LABELS = {"background": 0, "bone": 1, "anterior": 2, "Posterior": 5}
UNION = {"background": 0, "bone": 1, "Anterior": 2, "Posterior": 3}
CT_MAP = {0: 0, 1: 1, 2: 2, 5: 3}
MR_MAP = {0: 0, 1: 2, 2: 3}


def _write(path, array, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path), True)


def synthetic_source(raw, dataset_id, name, labels, num_cases=6, channels=("CT",), seed=0, label_values=None,
                     dataset_json_text=None):
    """A small nnU-Net raw dataset of random 'CT' volumes with box-shaped labels."""
    rng = np.random.RandomState(seed)
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    values = label_values or [v for v in labels.values() if v]
    for i in range(num_cases):
        for c in range(len(channels)):
            img = rng.randint(-1000, 1500, size=(14, 16, 12)).astype(np.int16)
            if i == 0:
                img[:2] = 0  # a zero border nnU-Net crops away
            _write(folder / "imagesTr" / f"ct_{i:03d}_{c:04d}.nii.gz", img)
        seg = np.zeros((14, 16, 12), np.uint8)
        for k, v in enumerate(values):
            seg[3 + 3 * k: 5 + 3 * k, 4:12, 2:10] = v
        _write(folder / "labelsTr" / f"ct_{i:03d}.nii.gz", seg)
    dj = {"channel_names": {str(c): n for c, n in enumerate(channels)}, "labels": labels, "numTraining": num_cases,
          "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(dataset_json_text or json.dumps(dj))
    return folder


def tree_digest(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def all_paths(root) -> list:
    return sorted(os.path.relpath(os.path.join(r, n), root) for r, ds, fs in os.walk(root) for n in ds + fs)


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    from nnunet_moe.demo_dataset import write_demo_dataset

    root = tmp_path_factory.mktemp("merge")
    mp = pytest.MonkeyPatch()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir()
        mp.setenv(var, str(root / var))
    raw = root / "nnUNet_raw"
    ct = synthetic_source(raw, 502, "SynthCT", CT_LABELS)
    mr = write_demo_dataset(503, "Hippo", num_test=2, num_train=6, log=lambda *a: None).folder
    before = {"ct": tree_digest(ct), "mr": tree_digest(mr)}
    log = []
    folder = merge_datasets(601, ["502:CT", "Dataset503_Hippo:mr"], ["anterior=Anterior"], name="Test",
                            log=log.append)
    yield {"root": root, "raw": raw, "ct": ct, "mr": mr, "folder": folder, "before": before, "log": log,
           "dj": json.load(open(os.path.join(folder, "dataset.json")))}
    mp.undo()


def test_union_labels_channels_and_case_ids(merged):
    dj = merged["dj"]
    assert os.path.basename(merged["folder"]) == "Dataset601_Test"
    assert dj["labels"] == UNION
    assert dj["channel_names"] == {"0": "noNorm"} and dj["file_ending"] == ".nii.gz" and dj["numTraining"] == 12
    ct_ids = [f"d502_ct_{i:03d}" for i in range(6)]
    mr = json.load(open(os.path.join(merged["mr"], "dataset.json")))["nnunet_moe_demo"]
    mr_ids = [f"d503_{c}" for c in mr["train"]]
    assert sorted(os.listdir(os.path.join(merged["folder"], "imagesTr"))) == sorted(
        f"{c}_0000.nii.gz" for c in ct_ids + mr_ids)
    assert sorted(os.listdir(os.path.join(merged["folder"], "labelsTr"))) == sorted(
        f"{c}.nii.gz" for c in ct_ids + mr_ids)
    assert sorted(os.listdir(os.path.join(merged["folder"], "imagesTs"))) == sorted(
        f"d503_{c}_0000.nii.gz" for c in mr["test"])
    assert sorted(os.listdir(os.path.join(merged["folder"], "labelsTs"))) == sorted(
        f"d503_{c}.nii.gz" for c in mr["test"])
    assert "Union labels: background=0, bone=1, Anterior=2, Posterior=3" in merged["log"]


def test_labels_relabelled_voxel_by_voxel(merged):
    for src, prefix, vmap, sub in ((merged["ct"], "d502_", CT_MAP, "Tr"), (merged["mr"], "d503_", MR_MAP, "Tr"),
                                   (merged["mr"], "d503_", MR_MAP, "Ts")):
        for f in sorted(os.listdir(os.path.join(src, f"labels{sub}"))):
            original = read(os.path.join(src, f"labels{sub}", f))
            out_path = os.path.join(merged["folder"], f"labels{sub}", prefix + f)
            expected = np.vectorize(vmap.get)(original)
            np.testing.assert_array_equal(read(out_path), expected)
            a, b = sitk.ReadImage(os.path.join(src, f"labels{sub}", f)), sitk.ReadImage(out_path)
            assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (
                b.GetSpacing(), b.GetOrigin(), b.GetDirection())
    # the synthetic CT labels really contain 5 (-> 3) and the hippocampus 1 and 2 (-> 2, 3)
    assert set(np.unique(read(os.path.join(merged["folder"], "labelsTr", "d502_ct_000.nii.gz")))) == {0, 1, 2, 3}


def test_recorded_metadata(merged):
    meta = merge_metadata(merged["dj"])
    assert meta["format_version"] == 1 and list(meta["sources"]) == ["d502", "d503"]
    ct, mr = meta["sources"]["d502"], meta["sources"]["d503"]
    assert {k: ct[k] for k in ("dataset", "modality", "channel_names", "labels", "label_values", "num_training",
                               "num_test")} == {
        "dataset": "Dataset502_SynthCT", "modality": "CT", "channel_names": {"0": "CT"},
        "labels": {"bone": "bone", "anterior": "Anterior", "Posterior": "Posterior"},
        "label_values": {"1": 1, "2": 2, "5": 3}, "num_training": 6, "num_test": 0}
    assert (mr["dataset"], mr["modality"], mr["labels"], mr["label_values"], mr["num_training"], mr["num_test"]) == (
        "Dataset503_Hippo", "MR", {"Anterior": "Anterior", "Posterior": "Posterior"}, {"1": 2, "2": 3}, 6, 2)
    assert ct["normalisation"]["scheme"] == "CTNormalization" and mr["normalisation"]["scheme"] == "ZScoreNormalization"
    assert len(meta["cases"]) == 12 and len(meta["test_cases"]) == 2
    assert meta["cases"]["d502_ct_003"] == {"source": "d502", "modality": "CT",
                                            "labels": ["bone", "Anterior", "Posterior"]}
    mr_case = next(c for c in meta["cases"] if c.startswith("d503_"))
    assert meta["cases"][mr_case] == {"source": "d503", "modality": "MR", "labels": ["Anterior", "Posterior"]}
    assert case_record(meta, next(iter(meta["test_cases"])))["source"] == "d503"
    with pytest.raises(ValueError, match=r"Case 'd999_x' is not in this merged dataset.*sources d502, d503"):
        case_record(meta, "d999_x")
    with pytest.raises(ValueError, match="has no 'nnunet_moe_merge' entry"):
        merge_metadata({"labels": {}})


def test_split_stratified_by_source(merged):
    splits = json.load(open(os.path.join(merged["folder"], "splits_final.json")))
    assert len(splits) == 5
    cases = set(merged["dj"][MERGE_KEY]["cases"])
    per_fold = [(sum(c.startswith("d502_") for c in s["val"]), sum(c.startswith("d503_") for c in s["val"]))
                for s in splits]
    assert per_fold == [(2, 1), (1, 2), (1, 1), (1, 1), (1, 1)]
    assert set().union(*(s["val"] for s in splits)) == cases
    assert all(set(s["train"]) == cases - set(s["val"]) for s in splits)
    by_source = {k: sorted(c for c in cases if c.startswith(k)) for k in ("d502", "d503")}
    assert stratified_splits(by_source) == splits  # deterministic
    # a source with fewer cases than folds continues the deal: no fold is left without validation cases
    small = stratified_splits({"a": ["a1", "a2", "a3"], "b": ["b1", "b2", "b3", "b4"]})
    assert [len(s["val"]) for s in small] == [2, 2, 1, 1, 1]
    with pytest.raises(ValueError, match="would have 4 training cases; nnU-Net's 5-fold cross-validation needs at "
                                         "least 5"):
        stratified_splits({"a": ["a1", "a2"], "b": ["b1", "b2"]})


def test_sources_byte_identical(merged):
    assert tree_digest(merged["ct"]) == merged["before"]["ct"]
    assert tree_digest(merged["mr"]) == merged["before"]["mr"]
    assert not [p for p in os.listdir(merged["raw"]) if "partial" in p]


def _fingerprint(merged, name):
    """nnU-Net's own dataset fingerprint of a source, as planning saves it."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    DatasetFingerprintExtractor(name, num_processes=1).run()
    return json.load(open(merged["root"] / "nnUNet_preprocessed" / name / "dataset_fingerprint.json"))


def test_ct_normalisation_is_nnunets_fingerprint_and_reproducible(merged):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    params = merged["dj"][MERGE_KEY]["sources"]["d502"]["normalisation"]
    # the statistics nnU-Net's own fingerprint gives the CT source, to the last bit
    fingerprint = _fingerprint(merged, "Dataset502_SynthCT")
    assert params["channels"][0] == fingerprint["foreground_intensity_properties_per_channel"]["0"]
    stats = params["channels"][0]
    for case in ("ct_000", "ct_004"):
        image, _ = SimpleITKIO().read_images([os.path.join(merged["ct"], "imagesTr", f"{case}_0000.nii.gz")])
        written = read(os.path.join(merged["folder"], "imagesTr", f"d502_{case}_0000.nii.gz"))
        np.testing.assert_array_equal(normalise_for_prediction(image, "CT", params)[0], written)
        box = (slice(2, None),) if case == "ct_000" else (slice(None),)  # ct_000's two zero slices are cropped
        clipped = np.clip(image[0][box], stats["percentile_00_5"], stats["percentile_99_5"])
        hand = (clipped - stats["mean"]) / stats["std"]
        np.testing.assert_allclose(written[box], hand, rtol=1e-5, atol=1e-5)
        nnunet = CTNormalization(intensityproperties=stats).run(image[0][box].copy())
        np.testing.assert_array_equal(written[box], nnunet)
        if case == "ct_000":
            assert not written[:2].any()  # outside nnU-Net's crop box: 0, so nnU-Net crops the merged case alike


def test_mr_normalisation_per_image_zscore(merged):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    params = merged["dj"][MERGE_KEY]["sources"]["d503"]["normalisation"]
    fp = _fingerprint(merged, "Dataset503_Hippo")
    assert params["median_relative_size_after_cropping"] == fp["median_relative_size_after_cropping"]
    assert params["use_mask_for_norm"] is False  # hippocampus crops are not cropped further by nnU-Net
    meta = merged["dj"][MERGE_KEY]
    first_train = next(c for c in meta["cases"] if c.startswith("d503_"))
    for case, sub in ((first_train, "Tr"), (next(iter(meta["test_cases"])), "Ts")):
        src = os.path.join(merged["mr"], f"images{sub}", case[len("d503_"):] + "_0000.nii.gz")
        image, _ = SimpleITKIO().read_images([src])
        written = read(os.path.join(merged["folder"], f"images{sub}", f"{case}_0000.nii.gz"))
        np.testing.assert_array_equal(normalise_for_prediction(image, "MR", params)[0], written)
        np.testing.assert_allclose(written, (image[0] - image[0].mean()) / image[0].std(), rtol=1e-4, atol=1e-4)


def test_mr_mask_for_norm_and_wrong_parameters():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization

    rng = np.random.RandomState(1)
    image = np.zeros((1, 10, 12, 8), np.float32)
    image[0, 2:8, 3:9, 1:7] = rng.rand(6, 6, 6) * 100 + 1
    image[0, 4, 5, 3] = 0  # a hole: inside nnU-Net's filled mask
    out = normalise_for_prediction(image, "MR", {"scheme": "ZScoreNormalization", "use_mask_for_norm": True})
    inside = image[0, 2:8, 3:9, 1:7]
    np.testing.assert_allclose(out[0, 2:8, 3:9, 1:7], (inside - inside.mean()) / inside.std(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[0, 2:8, 3:9, 1:7], ZScoreNormalization(True, {}).run(
        inside.copy(), np.zeros((6, 6, 6), np.int8)))
    outside = np.ones(image.shape[1:], bool)
    outside[2:8, 3:9, 1:7] = False
    assert not out[0][outside].any()
    with pytest.raises(ValueError, match="modality MR needs ZScoreNormalization parameters, got 'CTNormalization'"):
        normalise_for_prediction(image, "MR", {"scheme": "CTNormalization", "channels": [{}]})
    with pytest.raises(ValueError, match="modality 'PET': use one of CT, MR"):
        normalise_for_prediction(image, "PET", {})


# --- refusals: each names the value and what to do; nothing appears in any nnU-Net folder ------------------------


@pytest.fixture(scope="module")
def bad_sources(merged):
    raw = merged["raw"]
    synthetic_source(raw, 504, "TwoChannels", {"background": 0, "bone": 1}, channels=("CT", "CT"))
    synthetic_source(raw, 505, "NoLabels", {"background": 0})
    synthetic_source(raw, 506, "Clash", {"background": 0, "liver": 1, "hepar": 1}, label_values=[1])
    synthetic_source(raw, 507, "Duplicate", {}, dataset_json_text='{"channel_names": {"0": "CT"}, "labels": '
                     '{"background": 0, "liver": 1, "liver": 2}, "numTraining": 6, "file_ending": ".nii.gz"}')
    synthetic_source(raw, 508, "StrayValue", {"background": 0, "liver": 1}, label_values=[1, 7])
    os.makedirs(merged["root"] / "nnUNet_preprocessed" / "Dataset602_Planned")
    os.makedirs(merged["root"] / "nnUNet_results" / "Dataset603_Trained")
    return raw


REFUSALS = [
    (["--out", "620", "--source", "502:CT", "--source", "504:CT"],
     "different numbers of image channels (source 502 (Dataset502_SynthCT): 1, "
     "source 504 (Dataset504_TwoChannels): 2)"),
    (["--out", "620", "--source", "502:CT", "--source", "503:MR", "--alias", "bone=Posterior"],
     "source 502 (Dataset502_SynthCT): its labels 'bone' (1) and 'Posterior' (5) would both become the union label "
     "'Posterior' (one name with two meanings)"),
    (["--out", "620", "--source", "507:CT", "--source", "503:MR"],
     "lists 'liver' twice, as 1 and 2 (one name with two meanings"),
    (["--out", "620", "--source", "506:MR", "--source", "503:MR"],
     "source 506 (Dataset506_Clash): label value 1 has two names, 'liver' and 'hepar' (a value clash). If they are "
     "the same structure add --alias hepar=liver"),
    (["--out", "620", "--source", "508:MR", "--source", "503:MR"],
     "ct_000.nii.gz contains label value 7, which its dataset.json does not list (it lists [0, 1])"),
    (["--out", "601", "--source", "502:CT", "--source", "503:MR"], "Dataset id 601 is already used by "),
    (["--out", "602", "--source", "502:CT", "--source", "503:MR"], "nnUNet_preprocessed/Dataset602_Planned; "
     "merge-datasets never writes over an existing dataset. Choose a free id with --out."),
    (["--out", "603", "--source", "502:CT", "--source", "503:MR"], "nnUNet_results/Dataset603_Trained"),
    (["--out", "620", "--source", "777:CT", "--source", "503:MR"], "Source dataset '777' is not in $nnUNet_raw"),
    (["--out", "620", "--source", "Abdomen:CT", "--source", "503:MR"],
     "Source dataset 'Abdomen' is not in $nnUNet_raw"),
    (["--out", "620", "--source", "505:CT", "--source", "503:MR"],
     "source 505 (Dataset505_NoLabels) has no labels besides background"),
    (["--out", "620", "--source", "502:CT", "--source", "503:MR", "--alias", "spleen"],
     "--alias 'spleen': expected SOURCE_NAME=UNION_NAME with one '='"),
    (["--out", "620", "--source", "502:CT", "--source", "503:MR", "--alias", "a=b=c"], "with one '='"),
    (["--out", "620", "--source", "502:CT", "--source", "503:MR", "--alias", "spleen=Spleen"],
     "--alias spleen=Spleen: no source has a label named 'spleen'"),
    (["--out", "620", "--source", "502:PET", "--source", "503:MR"],
     "--source '502:PET': modality 'PET' is not accepted; use one of CT, MR"),
    (["--out", "620", "--source", "502", "--source", "503:MR"], "--source '502': expected DATASET:MODALITY"),
    (["--out", "620", "--source", "502:CT", "--source", "Dataset502_SynthCT:CT"], "Dataset502_SynthCT is given twice"),
    (["--out", "620", "--source", "502:CT"], "A merge needs at least two --source"),
    (["--out", "1000", "--source", "502:CT", "--source", "503:MR"], "--out 1000: a dataset id is an integer in"),
]


@pytest.mark.parametrize("argv,message", REFUSALS, ids=[f"refusal{i}" for i in range(len(REFUSALS))])
def test_refusals_before_anything_is_written(merged, bad_sources, argv, message, capsys):
    root = merged["root"]
    before = all_paths(root)
    assert main(["merge-datasets", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnunet-moe merge-datasets: error: ") and message in err and "Traceback" not in err
    assert all_paths(root) == before


def test_alias_resolves_a_value_clash(merged, bad_sources, capsys):
    assert main(["merge-datasets", "--out", "621", "--source", "506:MR", "--source", "503:MR",
                 "--alias", "hepar=liver"]) == 0
    out = capsys.readouterr().out
    assert "Union labels: background=0, liver=1, Anterior=2, Posterior=3" in out
    dj = json.load(open(bad_sources / "Dataset621_Merged" / "dataset.json"))
    assert dj[MERGE_KEY]["sources"]["d506"]["labels"] == {"liver": "liver", "hepar": "liver"}
    assert dj[MERGE_KEY]["sources"]["d506"]["label_values"] == {"1": 1}


def test_missing_nnunet_raw_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main(["merge-datasets", "--out", "620", "--source", "502:CT", "--source", "503:MR"]) == 2
    assert "nnUNet_raw" in capsys.readouterr().err


@pytest.mark.e2e
def test_stock_planning_keeps_the_record_and_the_split(merged):
    from nnunet_moe.nnunet_paths import planning_env

    import pickle

    run([nnunet_cmd("nnUNetv2_plan_and_preprocess"), "-d", "601", "-c", "3d_fullres", "-np", "1", "-npfp", "1",
         "--verify_dataset_integrity"], env=planning_env(), timeout=600)
    pre = merged["root"] / "nnUNet_preprocessed" / "Dataset601_Test"
    assert json.load(open(pre / "dataset.json"))[MERGE_KEY] == merged["dj"][MERGE_KEY]
    ours = json.load(open(os.path.join(merged["folder"], "splits_final.json")))
    assert json.load(open(pre / "splits_final.json")) == ours
    plans = json.load(open(pre / "nnUNetPlans.json"))["configurations"]["3d_fullres"]
    assert plans["normalization_schemes"] == ["NoNormalization"] and plans["use_mask_for_norm"] == [False]
    # the zeros written outside the CT source's crop box make nnU-Net crop the merged case to the same box
    props = pickle.load(open(pre / "nnUNetPlans_3d_fullres" / "d502_ct_000.pkl", "rb"))
    assert [[int(a), int(b)] for a, b in props["bbox_used_for_cropping"]] == [[2, 14], [0, 16], [0, 12]]
