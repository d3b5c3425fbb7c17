import json
import os

import pytest
import SimpleITK as sitk

from nnunet_moe.demo_dataset import bundled_cases, write_demo_dataset
from nnunet_moe.nnunet_paths import require_nnunet_paths


def test_bundled_subset_is_real_hippocampus_with_license():
    cases = bundled_cases()
    assert len(cases) >= 40
    from nnunet_moe.demo_dataset import DATA_DIR

    text = open(os.path.join(DATA_DIR, "SOURCE.md")).read()
    assert "CC BY-SA 4.0" in text and "Simpson" in text
    lab = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(DATA_DIR, "labels", cases[0] + ".nii.gz")))
    assert set(lab.ravel().tolist()) == {0, 1, 2}


def test_write_reuse_and_refuse(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    os.makedirs(tmp_path / "raw")
    ds = write_demo_dataset(502, "Hippocampus", num_test=10, log=lambda *a: None)
    dj = json.load(open(os.path.join(ds.folder, "dataset.json")))
    assert dj["numTraining"] == len(bundled_cases()) - 10
    assert len(os.listdir(os.path.join(ds.folder, "imagesTr"))) == dj["numTraining"]
    assert sorted(os.listdir(os.path.join(ds.folder, "labelsTs"))) == [c + ".nii.gz" for c in ds.test_cases]
    assert os.path.exists(os.path.join(ds.folder, "imagesTs", ds.test_cases[0] + "_0000.nii.gz"))

    # A second run reuses it and keeps the user's extra files.
    extra = os.path.join(ds.folder, "notes.txt")
    open(extra, "w").write("mine")
    again = write_demo_dataset(502, "Hippocampus", num_test=10, log=lambda *a: None)
    assert again.folder == ds.folder and open(extra).read() == "mine"

    # Another dataset at the same id, or a different dataset under our name: refused, untouched.
    with pytest.raises(FileExistsError, match="Dataset502_Hippocampus"):
        write_demo_dataset(502, "Other", log=lambda *a: None)
    with pytest.raises(FileExistsError, match="not this nnunet-moe demo dataset"):
        write_demo_dataset(502, "Hippocampus", num_test=12, log=lambda *a: None)
    assert json.load(open(os.path.join(ds.folder, "dataset.json"))) == dj


def test_missing_paths_message_says_what_to_set(monkeypatch):
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(RuntimeError, match="export nnUNet_raw=") as e:
        require_nnunet_paths("Benchmarking")
    assert "nnUNet_results" in str(e.value)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(RuntimeError, match="nnUNet_raw is not set"):
        write_demo_dataset(501, log=lambda *a: None)
