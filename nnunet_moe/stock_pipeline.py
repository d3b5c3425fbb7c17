"""nnU-Net's stock commands as steps that reuse what exists: plan once, train or continue, evaluate.

One implementation for everything that drives the real pipeline end to end (``nnunet-moe demo`` and
the convergence benchmark): each step runs the stock console command as a subprocess with its output
streamed, and never redoes or overwrites finished work — existing plans are reused, a finished
training is reused, an interrupted one is continued with ``--c``.
"""
from __future__ import annotations

import json
import os
import subprocess

from nnunet_moe.nnunet_paths import nnunet_command, planning_env


def run_streamed(cmd: list, env: dict | None = None, log=print) -> int:
    """Run a command, echoing its output live; a failure raises with the command line.

    Returns the peak resident memory in bytes of the largest process of the command's process tree
    (Linux ``wait4``: the command itself or any child it waited for)."""
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"Command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return int(usage.ru_maxrss) * 1024  # KiB on Linux


def training_env(device: str, **overrides) -> dict:
    env = dict(os.environ)
    if device == "cpu":
        env.setdefault("nnUNet_compile", "f")  # torch.compile costs minutes on CPU and gains nothing here
        # nnU-Net's default of 8 export workers: each spawned worker imports torch and nnU-Net again (~10 s of CPU),
        # which on a small CPU machine costs more than the exports it overlaps while the network holds the cores
        env.setdefault("nnUNet_def_n_proc", "1")
    env.update(overrides)
    return env


def ensure_plans(dataset_id: int, dataset_name: str, configuration: str, log=print, plans: str = "nnUNetPlans",
                 planner_args: tuple = ()) -> str:
    """Stock ``nnUNetv2_plan_and_preprocess`` for one configuration unless already done; the plans file.
    ``plans`` other than nnU-Net's default: planned with ``-overwrite_plans_name plans`` and ``planner_args``
    (nnU-Net's own options, e.g. ``("-overwrite_target_spacing", "2.5", "2.5", "2.5")``)."""
    pre = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name)
    plans_file = os.path.join(pre, f"{plans}.json")
    data = os.path.join(pre, f"{plans}_{configuration}")
    if os.path.isfile(plans_file) and _preprocessed_complete(pre, data):
        log(f"Reusing the existing plans and preprocessed {configuration} data in {pre}")
    else:  # nnU-Net overwrites what an interrupted preprocessing left
        named = [] if plans == "nnUNetPlans" else ["-overwrite_plans_name", plans, *planner_args]
        run_streamed([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", configuration,
                      "-np", "2", "--verify_dataset_integrity", *named], env=planning_env(), log=log)
    return plans_file


def _preprocessed_complete(pre: str, data: str) -> bool:
    """Every training case of ``pre/dataset.json`` has its ``.pkl`` in ``data`` (nnU-Net writes it last per case):
    a preprocessing killed half-way would otherwise be reused, and nnU-Net would split and train on fewer cases."""
    if not os.path.isdir(data) or not os.path.isfile(os.path.join(pre, "dataset.json")):
        return False
    with open(os.path.join(pre, "dataset.json")) as f:
        expected = json.load(f)["numTraining"]
    return sum(name.endswith(".pkl") for name in os.listdir(data)) >= expected


def trained_folder(dataset_name: str, trainer: str, configuration: str, fold: int, env: dict | None = None,
                   plans: str = "nnUNetPlans") -> str:
    """``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/fold_<fold>``, with ``nnUNet_results``
    from ``env`` (the environment the commands run with; None: this process's)."""
    results = (os.environ if env is None else env)["nnUNet_results"]
    return os.path.join(results, dataset_name, f"{trainer}__{plans}__{configuration}", f"fold_{fold}")


def training_log(fold_dir: str) -> dict:
    """nnU-Net's own training log (``logging``: epoch timestamps, learning rates, pseudo Dice) of a finished
    training, from its ``checkpoint_final.pth`` (kept across ``--c``, so right for a reused or continued run)."""
    from nnunet_moe.pretrained.checkpoint_io import numpy_scalar_globals, read_checkpoint

    return read_checkpoint(os.path.join(fold_dir, "checkpoint_final.pth"),
                           allowed_globals=numpy_scalar_globals())["logging"]


def epoch_seconds(log: dict) -> list:
    """Each epoch's duration in a :func:`training_log`; an epoch includes its validation iterations."""
    return [float(e) - float(s) for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]


def train_or_reuse(dataset_id: int, dataset_name: str, trainer: str, configuration: str, fold: int, device: str,
                   env: dict | None = None, log=print, plans: str = "nnUNetPlans") -> dict:
    """Stock ``nnUNetv2_train`` with ``env`` (None: :func:`training_env`): reuse a finished run, continue an
    interrupted one with ``--c``.

    Returns ``{"output_folder", "ran" (False when reused), "peak_rss_bytes" (None when reused)}``."""
    env = training_env(device) if env is None else env
    output_folder = trained_folder(dataset_name, trainer, configuration, fold, env, plans)
    if os.path.isfile(os.path.join(output_folder, "checkpoint_final.pth")):
        log(f"Reusing the finished training in {output_folder}")
        return {"output_folder": output_folder, "ran": False, "peak_rss_bytes": None}
    cmd = [nnunet_command("nnUNetv2_train"), str(dataset_id), configuration, str(fold), "-tr", trainer,
           "-device", device, "-p", plans]
    if os.path.isfile(os.path.join(output_folder, "checkpoint_latest.pth")):
        log(f"Continuing the interrupted training in {output_folder} (--c)")
        cmd.append("--c")
    peak = run_streamed(cmd, env=env, log=log)
    return {"output_folder": output_folder, "ran": True, "peak_rss_bytes": peak}


def predict_folder(images: str, out: str, dataset_id: int, trainer: str, configuration: str, fold: int, device: str,
                   tta: bool = True, env: dict | None = None, log=print, plans: str = "nnUNetPlans") -> None:
    """Stock ``nnUNetv2_predict`` of a folder of raw images with one fold's final checkpoint (``tta=False``:
    ``--disable_tta``, no test-time mirroring)."""
    run_streamed([nnunet_command("nnUNetv2_predict"), "-i", images, "-o", out, "-d", str(dataset_id),
                  "-c", configuration, "-f", str(fold), "-tr", trainer, "-p", plans, "-device", device, "-npp", "1",
                  "-nps", "1"] + ([] if tta else ["--disable_tta"]),
                 env=env if env is not None else training_env(device), log=log)


def evaluate_folder(labels_folder: str, pred_folder: str, plans_file: str, dataset_json_file: str) -> dict:
    """nnU-Net's stock evaluation (writes ``summary.json`` into ``pred_folder``)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder2

    summary_file = os.path.join(pred_folder, "summary.json")
    compute_metrics_on_folder2(labels_folder, pred_folder, dataset_json_file, plans_file, summary_file,
                               num_processes=1)
    with open(summary_file) as f:
        return json.load(f)
