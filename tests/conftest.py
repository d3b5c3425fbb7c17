"""Shared fixtures: the real-data nnU-Net pipeline, run once per session.

The end-to-end fixture writes the bundled hippocampus MRI subset as an nnU-Net raw dataset
into a temporary folder, and runs the stock ``nnUNetv2_plan_and_preprocess`` once; every
end-to-end test then trains/predicts with stock commands on that same preprocessed data.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)


def nnunet_cmd(name: str) -> str:
    return os.path.join(BIN, name)


def run(cmd: list, env: dict, timeout: int = 1800, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run a stock command; on failure show its output tail in the assertion message."""
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}"
    return proc


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory):
    """Environment with nnU-Net's folders in a temp dir and the demo dataset planned + preprocessed."""
    from nnunet_moe.demo_dataset import write_demo_dataset

    root = tmp_path_factory.mktemp("nnunet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(root / var)
        os.makedirs(env[var])
    old = {k: os.environ.get(k) for k in ("nnUNet_raw",)}
    os.environ["nnUNet_raw"] = env["nnUNet_raw"]
    try:
        # 24 training cases keep nnU-Net's fold-0 validation short (5 cases); the 10 held-out
        # cases are predicted with nnUNetv2_predict.
        ds = write_demo_dataset(501, "Hippocampus", num_test=10, num_train=24, log=lambda *a: None)
    finally:
        if old["nnUNet_raw"] is None:
            os.environ.pop("nnUNet_raw")
        else:
            os.environ["nnUNet_raw"] = old["nnUNet_raw"]
    run([nnunet_cmd("nnUNetv2_plan_and_preprocess"), "-d", "501", "-c", "3d_fullres", "2d", "-np", "2",
         "--verify_dataset_integrity"], env=env)
    write_splits_with_small_fold(os.path.join(env["nnUNet_preprocessed"], ds.name))
    train_env = dict(env, nnUNet_compile="f", nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1")
    return {"env": env, "train_env": train_env, "dataset": ds, "root": root}


# A sixth split beside nnU-Net's own five (nnU-Net reads any number from splits_final.json): one validation case,
# so that the tests of a trainer's mechanics (kill, --c, final validation, predict) pay nnU-Net's mirrored final
# validation once instead of five times (minutes for a VSS network in 2d on a CPU). Folds 0-4 stay nnU-Net's.
SMALL_VAL_FOLD = 5


def write_splits_with_small_fold(preprocessed: str) -> None:
    """``splits_final.json``: nnU-Net's seeded 5-fold split of the preprocessed cases (what its trainer would
    create) plus fold ``SMALL_VAL_FOLD``: every case but fold 0's first validation case trains, that case validates."""
    import json

    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    data = os.path.join(preprocessed, "nnUNetPlans_3d_fullres")
    keys = sorted(infer_dataset_class(data).get_identifiers(data))
    splits = generate_crossval_split(keys, seed=12345, n_splits=5)
    val = splits[0]["val"][:1]
    splits.append({"train": [k for k in keys if k not in val], "val": val})
    assert len(splits) == SMALL_VAL_FOLD + 1
    with open(os.path.join(preprocessed, "splits_final.json"), "w") as f:
        json.dump(splits, f)


def train_and_predict(nnunet_env: dict, trainer: str, configuration: str = "3d_fullres", fold: int = 0,
                      extra_train_args: tuple = (), tta: bool = True) -> dict:
    """Stock ``nnUNetv2_train`` then ``nnUNetv2_predict`` on the 10 held-out cases (``tta=False``:
    ``--disable_tta``), then nnU-Net's evaluation.

    Returns the paths and nnU-Net's evaluation summary (per-class and mean Dice).
    """
    from nnunet_moe.stock_pipeline import evaluate_folder

    env, ds = nnunet_env["train_env"], nnunet_env["dataset"]
    train = run([nnunet_cmd("nnUNetv2_train"), "501", configuration, str(fold), "-tr", trainer, "-device", "cpu",
                 *extra_train_args], env=env)
    model_dir = os.path.join(env["nnUNet_results"], ds.name, f"{trainer}__nnUNetPlans__{configuration}")
    out = os.path.join(str(nnunet_env["root"]), f"pred_{trainer}_{configuration}")
    predict = run([nnunet_cmd("nnUNetv2_predict"), "-i", ds.images_ts, "-o", out, "-d", "501", "-c", configuration,
                   "-f", str(fold), "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"]
                  + ([] if tta else ["--disable_tta"]), env=env)
    pre = os.path.join(env["nnUNet_preprocessed"], ds.name)
    summary = evaluate_folder(ds.labels_ts, out, os.path.join(pre, "nnUNetPlans.json"),
                              os.path.join(pre, "dataset.json"))
    return {"model_dir": model_dir, "pred_dir": out, "summary": summary, "train_log": train.stdout,
            "predict_log": predict.stdout}


def held_out_images(nnunet_env: dict, name: str, count: int = 3) -> tuple:
    """(a folder of links to the first ``count`` held-out images, their case ids): a predict test's input when
    the whole held-out set would only repeat the same code path at minutes of CPU inference."""
    ds = nnunet_env["dataset"]
    cases = ds.test_cases[:count]
    images = os.path.join(str(nnunet_env["root"]), f"images_{name}")
    os.makedirs(images)
    for case in cases:
        os.symlink(os.path.join(ds.images_ts, f"{case}_0000.nii.gz"), os.path.join(images, f"{case}_0000.nii.gz"))
    return images, cases


def assert_same_geometry(pred_dir: str, images_dir: str, cases: list) -> None:
    """Every held-out case has a prediction with the input image's size, spacing, origin and direction."""
    import SimpleITK as sitk

    for case in cases:
        img = sitk.ReadImage(os.path.join(images_dir, f"{case}_0000.nii.gz"))
        seg = sitk.ReadImage(os.path.join(pred_dir, f"{case}.nii.gz"))
        assert seg.GetSize() == img.GetSize(), case
        assert seg.GetSpacing() == pytest.approx(img.GetSpacing()), case
        assert seg.GetOrigin() == pytest.approx(img.GetOrigin()), case
        assert seg.GetDirection() == pytest.approx(img.GetDirection()), case
        values = set(sitk.GetArrayViewFromImage(seg).ravel().tolist())
        assert values <= {0, 1, 2}, (case, values)


def train_killed_then_resumed(nnunet_env: dict, trainer: str, configuration: str, fold: int = 0) -> dict:
    """Stock ``nnUNetv2_train`` on ``fold``, killed (SIGKILL) once its first ``checkpoint_latest.pth`` exists,
    then the same command with ``--c`` to the end. Returns the checkpoint at the kill, the final
    checkpoint and the resumed run's output. The trainer must have >= 2 epochs (short schedules
    save ``checkpoint_latest.pth`` after every epoch)."""
    import signal
    import time

    import torch

    env, ds = nnunet_env["train_env"], nnunet_env["dataset"]
    fold_dir = os.path.join(env["nnUNet_results"], ds.name, f"{trainer}__nnUNetPlans__{configuration}",
                            f"fold_{fold}")
    latest = os.path.join(fold_dir, "checkpoint_latest.pth")
    cmd = [nnunet_cmd("nnUNetv2_train"), "501", configuration, str(fold), "-tr", trainer, "-device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 1200
        while not os.path.isfile(latest) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"{trainer} ended (code {proc.returncode}) before it could be interrupted"
        # Stop the trainer as soon as its first checkpoint appears, then let it finish writing in short slices
        # until the file reads back whole: a fast epoch can never overwrite it with the next one (a wait on a
        # stable file size could, and did for M4oE Small's 3-iteration epochs).
        os.killpg(proc.pid, signal.SIGSTOP)
        at_kill = None
        while at_kill is None and time.time() < deadline:
            try:
                at_kill = torch.load(latest, map_location="cpu", weights_only=False)
            except Exception:  # still being written (a torch zip without its end record)
                os.killpg(proc.pid, signal.SIGCONT)
                time.sleep(0.05)
                os.killpg(proc.pid, signal.SIGSTOP)
        assert at_kill is not None, f"{latest} never became readable"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth"))
    resumed = run(cmd + ["--c"], env=env)
    final = torch.load(os.path.join(fold_dir, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    return {"fold_dir": fold_dir, "at_kill": at_kill, "final": final, "resumed_log": resumed.stdout}
