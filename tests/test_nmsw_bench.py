"""NMSW against nnU-Net's sliding window with untrained weights: ``nnunet-moe benchmark --untrained`` on one
bundled hippocampus case that stock nnU-Net plans in a temporary folder (no dataset, no training)."""
import json
import os

import pytest

from nnunet_moe.cli import main

BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nnunet_moe", "data",
                       "hippocampus")
CASE = "hippocampus_001"


def _row(output: str, prefix: str) -> list:
    line = next(line for line in output.splitlines() if line.startswith(prefix))
    return [cell.strip() for cell in line.strip("|").split("|")]


def _nnunet_named_case(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    os.symlink(os.path.join(BUNDLED, "images", CASE + ".nii.gz"), images / f"{CASE}_0000.nii.gz")
    os.symlink(os.path.join(BUNDLED, "labels", CASE + ".nii.gz"), labels / f"{CASE}.nii.gz")
    return str(images), str(labels)


def test_untrained_nmsw_against_sliding_window_on_bundled_case(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("NNUNET_MOE_NMSW_K", raising=False)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)  # not needed: the case is planned in a temporary folder
    images, labels = _nnunet_named_case(tmp_path)
    out = str(tmp_path / "out")
    assert main(["benchmark", "--untrained", "nnUNetTrainerNMSW", "-c", "3d_fullres", "-i", images, "-l", labels,
                 "--modes", "nmsw", "sliding_window", "--no-tta", "--num-cases", "1", "--nmsw-k", "3",
                 "--no-memory", "--no-progress", "-o", out]) == 0
    printed = capsys.readouterr().out
    nmsw = _row(printed, "| nnUNetTrainerNMSW (untrained) | nmsw |")
    window = _row(printed, "| nnUNetTrainerNMSW (untrained) | sliding_window |")
    # columns: model, mode, Dice, HD95, NSD, params (M), GFLOPs, s / case, peak memory, patches / case
    # a hippocampus volume fits in one patch: the patch grid has one cell, so K=3 is clamped to 1 and the
    # sliding window also runs one patch; NMSW adds the global pass, so it costs more FLOPs here
    assert float(nmsw[9]) == 1.0 and float(window[9]) == 1.0
    assert float(nmsw[6]) > float(window[6]) > 0
    assert float(nmsw[5]) > float(window[5]) > 0  # NMSW's parameters include the global net; the window's only local
    assert float(nmsw[7]) > 0 and float(window[7]) > 0
    assert nmsw[8] == window[8] == "n/a" and nmsw[2] == window[2] == "n/a"  # no memory run; untrained: not scored
    assert "untrained (seeded, seed 0) weights for nnUNetTrainerNMSW" in printed
    # --nmsw-k reaches the predictor as an option, not through the environment variable
    assert "NNUNET_MOE_NMSW_K" not in os.environ

    # the table's figures are the per-case measurements
    with open(os.path.join(out, "per_case.json")) as f:
        per_case = json.load(f)
    with open(os.path.join(out, "results.json")) as f:
        summary = {s["mode"]: s for s in json.load(f)["summary"]}
    assert [(c["mode"], c["case"]) for c in per_case["cases"]] == [("nmsw", CASE), ("sliding_window", CASE)]
    for case in per_case["cases"]:
        mode = summary[case["mode"]]
        assert mode["flops"] == case["flops"] and mode["seconds_per_case"] == case["seconds"]
        assert mode["patches_per_case"] == case["patches"] == 1
        assert case["seconds"] >= case["stage_seconds"]["network"] > 0
        assert case["peak_memory_bytes"] is None
        assert os.path.isfile(os.path.join(out, "predictions", f"nnUNetTrainerNMSW__untrained___{case['mode']}",
                                           CASE + ".nii.gz"))
    assert per_case["settings"]["dataset"] is None and per_case["settings"]["untrained"] == ["nnUNetTrainerNMSW"]


def test_bad_k_is_refused(tmp_path):
    from nnunet_moe.benchmark.command import benchmark

    with pytest.raises(ValueError, match="--nmsw-k 0: K must be a positive integer"):
        benchmark(None, "3d_fullres", [], None, images=str(tmp_path), labels=str(tmp_path),
                  untrained=["nnUNetTrainerNMSW"], nmsw_k=0, log=lambda *a: None)
