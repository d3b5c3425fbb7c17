"""End to end: NMSW-Net through the stock nnU-Net commands on the bundled hippocampus MRI.

Stock ``nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerNMSW_1epochs_5iters_lr1en3 -device cpu`` (nnU-Net's
data loading/augmentation with whole-volume samples, NMSW loss, nnU-Net's final validation with
``NMSWPredictor``), then stock ``nnUNetv2_predict`` on the 10 held-out cases and nnU-Net's
evaluation. ``NMSWPredictor`` prints one ``nnunet-moe NMSW:`` line per predicted
volume (with test-time mirroring the 8 flips make one volume), so counting those lines shows that
every validation and held-out case went through NMSW and none through the sliding window.
``NNUNET_MOE_NMSW_TTA=0`` switches test-time mirroring off (8x fewer passes; the unit tests check
mirroring) to keep the test at a few minutes on a CPU.

The stock ``nnUNetv2_predict`` is also run, in fresh processes that have not imported our trainer, on a tiny
NMSW model folder written by the test (seconds): NMSW with nnU-Net's ``--disable_tta``, output equal to
``NMSWNet.predict``, and a clear error for weights that do not fit.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import assert_same_geometry, nnunet_cmd, run, train_and_predict
from nmsw_fixtures import planned_nmsw, write_model_folder
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


# ----------------------------------------------------------------------------- stock nnUNetv2_predict, tiny model
BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nnunet_moe", "data",
                       "hippocampus")
CASE = "hippocampus_001"


def _stock_predict_env(root, network_weights, trainer_in_checkpoint="nnUNetTrainerNMSW"):
    """nnU-Net folders under ``root`` with ``Dataset501_Hippocampus/nnUNetTrainerNMSW__nnUNetPlans__3d_fullres``
    (tiny plans) and one bundled image as nnU-Net input; the environment has no nnU-Net variables of the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "NNUNET_MOE_NMSW"))}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(root / var)
        os.makedirs(env[var])
    write_model_folder(os.path.join(env["nnUNet_results"], "Dataset501_Hippocampus"), "nnUNetTrainerNMSW",
                       trainer_in_checkpoint, network_weights)
    images = root / "images"
    images.mkdir()
    os.symlink(os.path.join(BUNDLED, "images", CASE + ".nii.gz"), images / f"{CASE}_0000.nii.gz")
    return env, str(images)


def _predict_cmd(images, out, *extra):
    return [nnunet_cmd("nnUNetv2_predict"), "-i", images, "-o", out, "-d", "501", "-c", "3d_fullres", "-f", "0",
            "-tr", "nnUNetTrainerNMSW", "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar", *extra]


def test_stock_predict_runs_nmsw_with_nnunets_options_in_a_fresh_process(tmp_path):
    import numpy as np
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    network = planned_nmsw()  # global prediction foreground everywhere: K local passes run
    env, images = _stock_predict_env(tmp_path, network.state_dict())
    env["NNUNET_MOE_NMSW_K"] = "3"
    no_tta = run(_predict_cmd(images, str(tmp_path / "no_tta"), "--disable_tta", "--save_probabilities"), env=env)
    tta = run(_predict_cmd(images, str(tmp_path / "tta"), "-step_size", "0.7"), env=env)
    for log, passes in ((no_tta.stdout, 1), (tta.stdout, 8)):  # --disable_tta: 1 pass instead of nnU-Net's 8 flips
        assert log.count(LOG_PREFIX) == 1, log[-3000:]
        assert (f"global pass + top-K=3 local patches (patch (8, 8, 8), {passes} mirror pass(es), Gumbel noise "
                f"off), no sliding window") in log
    assert "-step_size 0.7 does not apply (the candidate-patch grid step 0.5 is part of the network)" in tta.stdout
    assert "does not apply" not in no_tta.stdout

    # the stock command's output is NMSWNet.predict (K=3, fp16 logits) exported by nnU-Net
    folder = os.path.join(env["nnUNet_results"], "Dataset501_Hippocampus", "nnUNetTrainerNMSW__nnUNetPlans__3d_fullres")
    plans_manager = PlansManager(os.path.join(folder, "plans.json"))
    configuration = plans_manager.get_configuration("3d_fullres")
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    data, _, properties = DefaultPreprocessor(verbose=False).run_case(
        [os.path.join(images, f"{CASE}_0000.nii.gz")], None, plans_manager, configuration, dataset_json)
    local_passes = []
    hook = network.local_net.register_forward_hook(lambda module, inputs, output: local_passes.append(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as nnUNetv2_predict -device cpu on this 2-core machine
    try:
        logits = network.predict(torch.from_numpy(data), k=3).half()
    finally:
        torch.set_num_threads(threads)
        hook.remove()
    assert len(local_passes) == 3  # K local passes, not only the upsampled global prediction
    segmentation, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, configuration, plans_manager.get_label_manager(dataset_json), properties, True)
    stock_seg, _ = SimpleITKIO().read_seg(str(tmp_path / "no_tta" / f"{CASE}.nii.gz"))
    stock_probabilities = np.load(str(tmp_path / "no_tta" / f"{CASE}.npz"))["probabilities"]
    assert np.array_equal(stock_seg[0], segmentation)
    assert np.allclose(stock_probabilities, probabilities, atol=1e-3)


def test_stock_predict_refuses_weights_that_do_not_fit_in_a_fresh_process(tmp_path):
    import subprocess

    plain_weights = planned_nmsw().local_net.state_dict()  # a plain nnU-Net CNN's weights under an NMSW name
    env, images = _stock_predict_env(tmp_path, plain_weights)
    out = tmp_path / "out"
    proc = subprocess.run(_predict_cmd(images, str(out)), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    assert proc.returncode != 0
    checkpoint = os.path.join(env["nnUNet_results"], "Dataset501_Hippocampus",
                              "nnUNetTrainerNMSW__nnUNetPlans__3d_fullres", "fold_0", "checkpoint_final.pth")
    assert (f"ValueError: checkpoint {checkpoint} was written by trainer 'nnUNetTrainerNMSW' (an NMSW-Net trainer) "
            f"but its weights do not fit the NMSW-Net network that trainer builds") in proc.stdout, proc.stdout[-3000:]
    assert not (out / f"{CASE}.nii.gz").exists()
