"""End to end: NMSW-Net through the stock nnU-Net commands on the bundled hippocampus MRI.

Stock ``nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerNMSW_1epochs_5iters_lr1en3 -device cpu`` (nnU-Net's
data loading/augmentation with whole-volume samples, NMSW loss, final validation through
``nnUNetPredictor``), then stock ``nnUNetv2_predict`` on the 10 held-out cases and nnU-Net's
evaluation. The NMSW predictor override prints one ``nnunet-moe NMSW:`` line per predicted
volume (with test-time mirroring the 8 flips make one volume), so counting those lines shows that
every validation and held-out case went through NMSW and none through the sliding window.
``NNUNET_MOE_NMSW_TTA=0`` switches test-time mirroring off (8x fewer passes; the unit tests check
mirroring) to keep the test at a few minutes on a CPU.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import assert_same_geometry, train_and_predict
from prediction_checks import assert_predictions_not_constant
from nnunet_moe.inference.nmsw_predictor import LOG_PREFIX

pytestmark = pytest.mark.e2e

TRAINER = "nnUNetTrainerNMSW_1epochs_5iters_lr1en3"  # lr 1e-3: 5 iterations move the output off one label


def _finite_dice_values(summary: dict) -> list:
    values = [summary["foreground_mean"]["Dice"]] + [m["Dice"] for m in summary["mean"].values()]
    return values


def test_nmsw_trains_validates_and_predicts_without_sliding_window(nnunet_env):
    no_tta = dict(nnunet_env, train_env=dict(nnunet_env["train_env"], NNUNET_MOE_NMSW_TTA="0"))
    res = train_and_predict(no_tta, TRAINER)
    ds = nnunet_env["dataset"]
    env = nnunet_env["train_env"]
    fold_dir = os.path.join(res["model_dir"], "fold_0")

    # training ran with our trainer and the NMSW network
    assert f"Using trainer '{TRAINER}'" in res["train_log"]
    assert "NMSW: whole-volume samples of size" in res["train_log"]
    checkpoint = torch.load(os.path.join(fold_dir, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    prefixes = {key.split(".")[0] for key in checkpoint["network_weights"]}
    assert prefixes == {"global_net", "local_net", "objectness_head", "aggregation"}

    # final validation: nnU-Net's summary, every fold-0 validation case predicted by NMSW exactly once
    with open(os.path.join(env["nnUNet_preprocessed"], ds.name, "splits_final.json")) as f:
        val_cases = json.load(f)[0]["val"]
    with open(os.path.join(fold_dir, "validation", "summary.json")) as f:
        val_summary = json.load(f)
    assert len(val_summary["metric_per_case"]) == len(val_cases)
    assert res["train_log"].count(LOG_PREFIX) == len(val_cases)
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in _finite_dice_values(val_summary))

    # stock prediction: input geometry, labels {0, 1, 2} only, one NMSW pass per held-out case
    assert_same_geometry(res["pred_dir"], ds.images_ts, ds.test_cases)
    assert_predictions_not_constant(res["pred_dir"], ds.test_cases)
    assert res["predict_log"].count(LOG_PREFIX) == len(ds.test_cases)
    assert res["predict_log"].count("1 mirror pass(es)") == len(ds.test_cases)
    assert "no sliding window" in res["predict_log"]
    # One epoch of 5 iterations is far from a trained model (nnU-Net's own trainer scores Dice 0.08
    # after 150 iterations here), so no Dice threshold is asserted: only that nnU-Net's evaluation of
    # the 10 cases gives finite Dice values in [0, 1].
    dice_values = _finite_dice_values(res["summary"])
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in dice_values)
    print(f"{TRAINER}: held-out mean Dice {res['summary']['foreground_mean']['Dice']:.3f}, fold-0 validation "
          f"{val_summary['foreground_mean']['Dice']:.3f}")
