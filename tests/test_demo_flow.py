"""The demo's orchestration: stock commands in order, nothing overwritten on a second run.

The nnU-Net commands are replaced by a recorder that creates the files they would create;
the real commands run in the end-to-end tests.
"""
from __future__ import annotations

import json
import os

import pytest

from nnunet_moe import demo, stock_pipeline


@pytest.fixture
def fake_nnunet(monkeypatch):
    calls = []

    def run_streamed(cmd, env=None, log=print):
        calls.append(cmd)
        name = os.path.basename(cmd[0])
        if name == "nnUNetv2_plan_and_preprocess":
            assert "nnUNet_n_proc_DA" not in env  # 0 breaks nnU-Net 2.8.1's planning
            pre = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset501_Hippocampus")
            os.makedirs(os.path.join(pre, "nnUNetPlans_3d_fullres"), exist_ok=True)
            open(os.path.join(pre, "nnUNetPlans_3d_fullres", "hippocampus_001.pkl"), "w").close()  # a case's last file
            json.dump({}, open(os.path.join(pre, "nnUNetPlans.json"), "w"))
            json.dump({"labels": {"background": 0, "Anterior": 1, "Posterior": 2}, "numTraining": 1},
                      open(os.path.join(pre, "dataset.json"), "w"))
        elif name == "nnUNetv2_train":
            assert env["nnUNet_compile"] == "f"
            out = os.path.join(os.environ["nnUNet_results"], "Dataset501_Hippocampus",
                               f"{cmd[cmd.index('-tr') + 1]}__nnUNetPlans__3d_fullres", "fold_0")
            os.makedirs(out, exist_ok=True)
            open(os.path.join(out, "checkpoint_final.pth"), "w").write("weights")
        elif name == "nnUNetv2_predict":
            os.makedirs(cmd[cmd.index("-o") + 1])

    monkeypatch.setattr(stock_pipeline, "run_streamed", run_streamed)
    monkeypatch.setattr(stock_pipeline, "nnunet_command", lambda name: f"/bin/{name}")
    monkeypatch.setattr(demo, "evaluate_folder", lambda *a: {"mean": {"1": {"Dice": 0.5}, "2": {"Dice": 0.7}},
                                                             "foreground_mean": {"Dice": 0.6}})
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return calls


def test_demo_runs_stock_steps_then_reuses_everything(fake_nnunet, tmp_path, monkeypatch):
    lines = []
    first = demo.run_demo(work_dir=str(tmp_path / "w"), log=lines.append)
    names = [os.path.basename(c[0]) for c in fake_nnunet]
    assert names == ["nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_predict"]
    assert any("nnUNet_raw was not set; using" in l for l in lines)
    assert first["mean_dice"] == 0.6 and first["dice"] == {1: 0.5, 2: 0.7}
    assert any("Anterior" in l and "0.500" in l for l in lines)

    fake_nnunet.clear()
    lines.clear()
    second = demo.run_demo(work_dir=str(tmp_path / "w"), log=lines.append)
    # plans and the finished model are reused; predictions go to a new folder
    assert [os.path.basename(c[0]) for c in fake_nnunet] == ["nnUNetv2_predict"]
    assert any("Reusing the finished training" in l for l in lines)
    assert second["predictions"] == first["predictions"] + "_2"
    ckpt = os.path.join(first["output_folder"], "checkpoint_final.pth")
    assert open(ckpt).read() == "weights"


def test_interrupted_training_is_continued(fake_nnunet, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    out = os.path.join(str(tmp_path / "res"), "Dataset501_Hippocampus",
                       f"{demo.DEFAULT_TRAINER}__nnUNetPlans__3d_fullres", "fold_0")
    os.makedirs(out)
    open(os.path.join(out, "checkpoint_latest.pth"), "w").write("half")
    demo.run_demo(work_dir=str(tmp_path / "w"), log=lambda *a: None)
    train = [c for c in fake_nnunet if os.path.basename(c[0]) == "nnUNetv2_train"][0]
    assert train[-1] == "--c"


def test_held_out_prediction_without_mirroring_unless_asked(fake_nnunet, tmp_path):
    demo.run_demo(work_dir=str(tmp_path / "w"), log=lambda *a: None)
    demo.run_demo(work_dir=str(tmp_path / "w"), tta=True, log=lambda *a: None)
    predicts = [c for c in fake_nnunet if os.path.basename(c[0]) == "nnUNetv2_predict"]
    assert [("--disable_tta" in c) for c in predicts] == [True, False]
    assert demo.DEFAULT_TRAINER.startswith("nnUNetTrainerSwinSMTSmall_")  # the demo shows one of ours


def test_cpu_training_starts_one_export_worker_unless_the_user_chose(monkeypatch):
    """nnU-Net spawns 8 export workers by default, each importing torch and nnU-Net again: on CPU the training
    environment asks for one; a user's own nnUNet_def_n_proc, and GPU runs, keep nnU-Net's behaviour."""
    monkeypatch.delenv("nnUNet_def_n_proc", raising=False)
    assert stock_pipeline.training_env("cpu")["nnUNet_def_n_proc"] == "1"
    assert "nnUNet_def_n_proc" not in stock_pipeline.training_env("cuda")
    monkeypatch.setenv("nnUNet_def_n_proc", "4")
    assert stock_pipeline.training_env("cpu")["nnUNet_def_n_proc"] == "4"
