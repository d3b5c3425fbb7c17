"""``nnunet-moe demo``: from nothing to a trained and evaluated model on real data.

Every step is the stock nnU-Net command, run as a subprocess with its output streamed
(so progress is visible), in this order:

1. write the bundled hippocampus MRI subset as ``$nnUNet_raw/Dataset501_Hippocampus``;
2. ``nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres``;
3. ``nnUNetv2_train 501 3d_fullres 0 -tr <trainer>`` with a short schedule (default: Swin SMT Small,
   3 epochs x 30 iterations at lr 1e-3; ``-tr`` picks any other trainer, nnU-Net's included);
4. ``nnUNetv2_predict`` on the held-out cases (``imagesTs``), without test-time mirroring unless
   ``tta`` (mirroring runs 8 passes per 3D patch: most of a CPU demo's prediction time);
5. nnU-Net's own evaluation against ``labelsTs``: per-class Dice.

Nothing is overwritten on a second run: an existing plan is reused, a finished training
is reused (an interrupted one is continued with ``--c``), predictions go to a new folder.
"""
from __future__ import annotations

import json
import os
import time

from nnunet_moe.demo_dataset import (DEFAULT_CONFIGURATION, DEFAULT_DATASET_ID, DEFAULT_DATASET_NAME,
                                     write_demo_dataset)
from nnunet_moe.folders import free_folder
from nnunet_moe.nnunet_paths import set_default_paths
from nnunet_moe.stock_pipeline import ensure_plans, evaluate_folder, predict_folder, train_or_reuse

# One of ours, sized for a CPU: Swin SMT Small (feature 24, 8 experts) at 3 epochs x 30 iterations. Its
# paper's lr 1e-4 assumes hundreds of epochs (fold-0 Dice 0.166 after 90 iterations, README); 1e-3 suits the budget.
DEFAULT_TRAINER = "nnUNetTrainerSwinSMTSmall_3epochs_30iters_lr1en3"


def run_demo(work_dir: str = "nnunet_moe_demo", dataset_id: int = DEFAULT_DATASET_ID,
             dataset_name: str = DEFAULT_DATASET_NAME,
             trainer: str = DEFAULT_TRAINER, configuration: str = DEFAULT_CONFIGURATION, fold: int = 0,
             device: str = "cpu", num_test: int = 10, num_train: int | None = None, tta: bool = False,
             log=print) -> dict:
    t0 = time.time()
    for var, value in set_default_paths(work_dir):
        log(f"{var} was not set; using {value}")
    log("[1/5] Demo dataset (bundled real MRI, CC BY-SA 4.0: MSD Hippocampus)")
    ds = write_demo_dataset(dataset_id, dataset_name, num_test=num_test, num_train=num_train, log=log)

    pre = os.path.join(os.environ["nnUNet_preprocessed"], ds.name)
    log(f"[2/5] nnU-Net planning and preprocessing ({configuration})")
    plans_file = ensure_plans(dataset_id, ds.name, configuration, log=log)

    log(f"[3/5] Training {trainer} ({configuration}, fold {fold}, device {device})")
    output_folder = train_or_reuse(dataset_id, ds.name, trainer, configuration, fold, device, log=log)["output_folder"]

    pred_folder = free_folder(os.path.join(os.path.dirname(output_folder), f"demo_predictions_fold{fold}"))
    log(f"[4/5] Predicting the {len(ds.test_cases)} held-out cases into {pred_folder}"
        + ("" if tta else " (no test-time mirroring; --tta turns it on)"))
    predict_folder(ds.images_ts, pred_folder, dataset_id, trainer, configuration, fold, device, tta=tta, log=log)

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

