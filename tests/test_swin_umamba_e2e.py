"""Swin-UMamba and Swin-UMamba† end to end with the stock nnU-Net commands on the real demo data.

Each run: stock ``nnUNetv2_train`` killed (SIGKILL) after its first checkpoint, the same command
with ``--c`` to the end (final validation included, on the one-case fold ``SMALL_VAL_FOLD``), then stock
``nnUNetv2_predict`` on 3 of the held-out cases. 2D as in the paper, 3D with the six-direction scan. From
scratch (``...Scratch``): the ImageNet checkpoint cannot be downloaded here; the pretrained path is tested on
a checkpoint in the VMamba layout (tests/test_vmamba_pretrained.py).

The hippocampus 2d plans ask for 59 slices per batch, minutes per iteration for a VSS network on a
CPU; ``_bs4`` (short-schedule suffix) trains with 4 instead. No Dice threshold: 2 x 4 iterations
train a Mamba U-Net far too little to beat chance reliably (Dice beside nnU-Net under the same
schedule is in the README, measured with longer runs); at learning rate 1e-3 (``_lr1en3``) they are
enough to move the 2d predictions off a single label, which is asserted (not for the 3D run, see
below).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import SMALL_VAL_FOLD, assert_same_geometry, held_out_images, nnunet_cmd, run, train_killed_then_resumed
from prediction_checks import assert_predictions_not_constant

pytestmark = pytest.mark.e2e


# One run per trainer and per configuration (each pair runs the same code paths; CPU inference of a
# VSS network is slow: the 2d final validation of fold 0's five cases took ~5 min here, 37 slices x 4
# mirrors per case, hence the one-case fold).
# expect_foreground: whether the run is long enough for a non-constant prediction. The 3D run's 8
# iterations (2 x 4, batch 2) left Swin-UMamba-dagger predicting background only in a CI run; that it
# learns is asserted by tests/test_learning.py, this test checks the commands' mechanics.
@pytest.mark.parametrize("trainer,configuration,expect_foreground", [
    ("nnUNetTrainerSwinUMambaScratch_2epochs_4iters_bs4_lr1en3", "2d", True),
    ("nnUNetTrainerSwinUMambaDScratch_2epochs_4iters_lr1en3", "3d_fullres", False),
])
def test_swin_umamba_trains_resumes_after_kill_validates_predicts(nnunet_env, trainer, configuration,
                                                                 expect_foreground):
    env, ds = nnunet_env["train_env"], nnunet_env["dataset"]
    res = train_killed_then_resumed(nnunet_env, trainer, configuration, fold=SMALL_VAL_FOLD)
    saved, final = res["at_kill"], res["final"]
    assert saved["current_epoch"] == 1
    assert "Epoch 1" in res["resumed_log"] and "Epoch 0\n" not in res["resumed_log"]
    assert final["current_epoch"] == 2 and final["trainer_name"] == trainer
    scan_keys = [k for k in final["network_weights"] if k.endswith(".self_attention.A_logs")]
    assert scan_keys, "checkpoint has no selective-scan (VSS) parameters"
    # The resumed run trained on from the saved state: the VSS parameters moved.
    assert any(not torch.equal(saved["network_weights"][k], final["network_weights"][k])
               for k in final["network_weights"] if ".self_attention." in k)
    fold_dir = res["fold_dir"]
    with open(os.path.join(fold_dir, "validation", "summary.json")) as f:
        assert len(json.load(f)["metric_per_case"]) == 1  # the one-case fold: one mirrored final validation

    # Stock predict on 3 of the held-out cases (a folder of links to them)
    images, cases = held_out_images(nnunet_env, f"{trainer}_{configuration}")
    out = os.path.join(str(nnunet_env["root"]), f"pred_{trainer}_{configuration}")
    run([nnunet_cmd("nnUNetv2_predict"), "-i", images, "-o", out, "-d", "501", "-c", configuration,
         "-f", str(SMALL_VAL_FOLD), "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"],
        env=env)
    assert sorted(f for f in os.listdir(out) if f.endswith(".nii.gz")) == sorted(f"{c}.nii.gz" for c in cases)
    assert_same_geometry(out, ds.images_ts, cases)
    if expect_foreground:
        assert_predictions_not_constant(out, cases)
