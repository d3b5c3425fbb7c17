"""``nnunet-moe demo``: from nothing to a trained and evaluated model on real data.

Every step is the stock nnU-Net command, run as a subprocess with its output streamed
(so progress is visible), in this order:

1. write the bundled hippocampus MRI subset as ``$nnUNet_raw/Dataset501_Hippocampus``;
2. ``nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres``;
3. ``nnUNetv2_train 501 3d_fullres 0 -tr <trainer>`` with a short schedule;
4. ``nnUNetv2_predict`` on the held-out cases (``imagesTs``);
5. nnU-Net's own evaluation against ``labelsTs``: per-class Dice.

Nothing is overwritten on a second run: an existing plan is reused, a finished training
is reused (an interrupted one is continued with ``--c``), predictions go to a new folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

from nnunet_moe.demo_dataset import (DEFAULT_CONFIGURATION, DEFAULT_DATASET_ID, DEFAULT_DATASET_NAME,
                                     write_demo_dataset)
from nnunet_moe.folders import free_folder
from nnunet_moe.nnunet_paths import nnunet_command, planning_env, set_default_paths

DEFAULT_TRAINER = "nnUNetTrainerAdam1en3_3epochs_30iters"


def run_streamed(cmd: list, env: dict | None = None, log=print) -> None:
    """Run a command, echoing its output live; a failure raises with the command line."""
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"Command failed with exit code {proc.returncode}: {' '.join(cmd)}")


def training_env(device: str) -> dict:
    env = dict(os.environ)
    if device == "cpu":
        env.setdefault("nnUNet_compile", "f")  # torch.compile costs minutes on CPU and gains nothing here
    return env


def run_demo(work_dir: str = "nnunet_moe_demo", dataset_id: int = DEFAULT_DATASET_ID,
             dataset_name: str = DEFAULT_DATASET_NAME,
             trainer: str = DEFAULT_TRAINER, configuration: str = DEFAULT_CONFIGURATION, fold: int = 0,
             device: str = "cpu", num_test: int = 10, num_train: int | None = None, log=print) -> dict:
    t0 = time.time()
    for var, value in set_default_paths(work_dir):
        log(f"{var} was not set; using {value}")
    log("[1/5] Demo dataset (bundled real MRI, CC BY-SA 4.0: MSD Hippocampus)")
    ds = write_demo_dataset(dataset_id, dataset_name, num_test=num_test, num_train=num_train, log=log)

    pre = os.path.join(os.environ["nnUNet_preprocessed"], ds.name)
    plans_file = os.path.join(pre, "nnUNetPlans.json")
    log(f"[2/5] nnU-Net planning and preprocessing ({configuration})")
    plans_ready = os.path.isfile(plans_file) and os.path.isdir(os.path.join(pre, f"nnUNetPlans_{configuration}"))
    if plans_ready:
        log(f"Reusing the existing plans and preprocessed data in {pre}")
    else:
        run_streamed([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", configuration,
                      "-np", "2", "--verify_dataset_integrity"], env=planning_env(), log=log)

    output_folder = os.path.join(os.environ["nnUNet_results"], ds.name, f"{trainer}__nnUNetPlans__{configuration}",
                                 f"fold_{fold}")
    log(f"[3/5] Training {trainer} ({configuration}, fold {fold}, device {device})")
    train_cmd = [nnunet_command("nnUNetv2_train"), str(dataset_id), configuration, str(fold), "-tr", trainer,
                 "-device", device]
    if os.path.isfile(os.path.join(output_folder, "checkpoint_final.pth")):
        log(f"Reusing the finished training in {output_folder}")
    else:
        if os.path.isfile(os.path.join(output_folder, "checkpoint_latest.pth")):
            log(f"Continuing the interrupted training in {output_folder} (--c)")
            train_cmd.append("--c")
        run_streamed(train_cmd, env=training_env(device), log=log)

    pred_folder = free_folder(os.path.join(os.path.dirname(output_folder), f"demo_predictions_fold{fold}"))
    log(f"[4/5] Predicting the {len(ds.test_cases)} held-out cases into {pred_folder}")
    run_streamed([nnunet_command("nnUNetv2_predict"), "-i", ds.images_ts, "-o", pred_folder, "-d", str(dataset_id),
                  "-c", configuration, "-f", str(fold), "-tr", trainer, "-device", device, "-npp", "1", "-nps", "1"],
                 env=training_env(device), log=log)

    log("[5/5] Evaluating against the held-out labels (nnU-Net's evaluation)")
    summary = evaluate_folder(ds.labels_ts, pred_folder, plans_file, os.path.join(pre, "dataset.json"))
    minutes = (time.time() - t0) / 60
    per_class = {int(k): v["Dice"] for k, v in summary["mean"].items()}
    names = {v: k for k, v in json.load(open(os.path.join(pre, "dataset.json")))["labels"].items()}
    log("")
    log(f"Held-out Dice ({len(ds.test_cases)} cases, {trainer}, {configuration}, fold {fold}):")
    for label, dice in sorted(per_class.items()):
        log(f"  {label} {names.get(label, '?'):<12} {dice:.3f}")
    log(f"  mean           {summary['foreground_mean']['Dice']:.3f}")
    log(f"Model and training log:  {output_folder}")
    log(f"Predictions:             {pred_folder}")
    log(f"Metrics (nnU-Net json):  {os.path.join(pred_folder, 'summary.json')}")
    log(f"Total time: {minutes:.1f} min")
    return {"dice": per_class, "mean_dice": summary["foreground_mean"]["Dice"], "output_folder": output_folder,
            "predictions": pred_folder, "minutes": minutes, "dataset": ds}


def evaluate_folder(labels_folder: str, pred_folder: str, plans_file: str, dataset_json_file: str) -> dict:
    """nnU-Net's stock evaluation (writes ``summary.json`` into ``pred_folder``)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder2

    summary_file = os.path.join(pred_folder, "summary.json")
    compute_metrics_on_folder2(labels_folder, pred_folder, dataset_json_file, plans_file, summary_file,
                               num_processes=1)
    with open(summary_file) as f:
        return json.load(f)
