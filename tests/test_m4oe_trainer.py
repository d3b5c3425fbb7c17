"""``nnUNetTrainerM4oE``: experts from the merge record, partial labels and modality from ``batch['keys']``,
stage-2 weights from the environment, per-source Dice in the final validation (``datasets/evaluation.py``).

The merged dataset here is the bundled hippocampus data described as two sources: ``d502`` ("CT",
annotates only Anterior) and ``d503`` (MR, Anterior and Posterior): enough for the trainer's lookups and
train steps without planning (the stock pipeline on a real merge runs in ``test_m4oe_e2e``-style tests).
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_learning import LR, fixed_batch, targets_for
from trainer_fixtures import hippocampus_dataset_json, hippocampus_plans, make_trainer

from nnunet_moe.datasets.evaluation import format_per_source, per_source_dice, per_source_dice_folders
from nnunet_moe.datasets.metadata import MERGE_KEY
from nnunet_moe.layers.m4oe import M4oE
from nnunet_moe.pretrained.load_report import LoadReport
from nnunet_moe.pretrained.m4oe_mae_weights import WEIGHTS_NAME
from nnunet_moe.training.m4oe_trainer import (MAE_WEIGHTS_ENV, nnUNetTrainerM4oE, nnUNetTrainerM4oEModalityGate,
                                              nnUNetTrainerM4oESelect)
from nnunet_moe.training.partial_labels import PLANS_KEY, PartialLabelDCandCELoss

KEYS = ["d502_hippocampus_001", "d502_hippocampus_001", "d503_hippocampus_008", "d503_hippocampus_008"]


def merged_dataset_json() -> dict:
    dj = hippocampus_dataset_json()
    ct_only = {"source": "d502", "modality": "CT", "labels": ["Anterior"]}
    mr = {"source": "d503", "modality": "MR", "labels": ["Anterior", "Posterior"]}
    dj[MERGE_KEY] = {
        "format_version": 1,
        "sources": {"d502": {"dataset": "Dataset502_SynthCT", "modality": "CT"},
                    "d503": {"dataset": "Dataset503_Hippo", "modality": "MR"}},
        "cases": {"d502_hippocampus_001": ct_only, "d502_hippocampus_004": ct_only,
                  "d503_hippocampus_008": mr, "d503_hippocampus_010": mr}}
    return dj


def merged_trainer(cls, tmp_path, monkeypatch, embed_dim: int = 24):
    """The trainer as nnU-Net's ``initialize`` would set it up (network, optimiser, loss), on the merged json;
    ``embed_dim`` 24 instead of 96 (16x fewer parameters: CPU time; the layout is the same)."""
    cls = type(cls.__name__, (cls,), {"embed_dim": embed_dim})  # as nnUNetTrainerM4oESmall
    monkeypatch.setenv("nnUNet_compile", "f")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    trainer = cls(hippocampus_plans(), "2d", 0, merged_dataset_json(), torch.device("cpu"))
    torch.manual_seed(0)
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                         trainer.label_manager.num_segmentation_heads, True)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    for group in trainer.optimizer.param_groups:
        group["lr"] = LR
    trainer.loss = trainer._build_loss()
    return trainer


@pytest.fixture(scope="module")
def batch():
    mp = pytest.MonkeyPatch()
    import pathlib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(nnUNetTrainerM4oE, "2d", pathlib.Path(tmp), mp)
        data, seg = fixed_batch(trainer)  # 2 slices of hippocampus_001, then 2 of hippocampus_008
        target = targets_for(trainer, seg)
    mp.undo()
    return {"data": data, "target": target, "keys": KEYS}


def test_experts_from_the_merge_record_and_saved_in_the_plans(tmp_path, monkeypatch):
    trainer = merged_trainer(nnUNetTrainerM4oE, tmp_path, monkeypatch, embed_dim=96)
    net = trainer.network
    assert trainer.plans_manager.plans[PLANS_KEY] == {"modalities": ["CT", "MR"]}
    assert net.num_experts == 2 and net.gate == "experts" and len(net.moe_layers()) == 14
    assert trainer.configuration_manager.patch_size == [64, 32]
    # the predictor rebuilds the network from the saved plans alone, and calls it without a modality
    rebuilt = nnUNetTrainerM4oE.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                            3, False)
    assert rebuilt.state_dict().keys() == net.state_dict().keys()
    with torch.no_grad():
        assert rebuilt.eval()(torch.randn(1, 1, 64, 32)).shape == (1, 3, 64, 32)
    log = open(trainer.log_file).read()
    assert "2 experts per M4oE layer, one per modality (CT, MR; sources d502 Dataset502_SynthCT CT, d503 " in log
    assert "gate 'experts'; partial-label loss 'marginal'" in log


def test_plain_dataset_is_one_modality_fully_annotated(tmp_path, monkeypatch):
    trainer = make_trainer(nnUNetTrainerM4oE, "2d", tmp_path, monkeypatch)
    assert trainer.plans_manager.plans[PLANS_KEY] == {"modalities": []}
    net = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3, False)
    assert net.num_experts == 0 and not net.moe_layers()  # Swin-Unet's dense MLPs
    trainer.loss = trainer._build_loss()
    trainer._use_batch_cases({})  # no keys needed
    assert trainer._partial_loss.annotated is None
    assert "is not a merged dataset" in open(trainer.log_file).read()


@pytest.mark.parametrize("cls,mode", [(nnUNetTrainerM4oE, "marginal"), (nnUNetTrainerM4oESelect, "select")])
def test_train_steps_use_each_cases_annotated_labels(cls, mode, batch, tmp_path, monkeypatch):
    trainer = merged_trainer(cls, tmp_path, monkeypatch)
    # nnU-Net's deep-supervision wrapper, our loss inside it with the mode of the class
    assert isinstance(trainer.loss.loss, PartialLabelDCandCELoss) and trainer.loss.loss.mode == mode
    assert len(trainer.loss.weight_factors) == 4
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    seen = []
    hook = trainer.loss.loss.register_forward_pre_hook(lambda m, a: seen.append(m.annotated.clone()))
    losses = [float(trainer.train_step(dict(batch))["loss"]) for _ in range(2)]
    hook.remove()
    assert all(np.isfinite(losses))
    expected = [[True, True, False]] * 2 + [[True, True, True]] * 2  # d502 does not annotate Posterior
    # 2 steps x 3 outputs (nnU-Net weighs the 4th 0)
    assert all(m.tolist() == expected for m in seen) and len(seen) == 6
    assert any(not torch.equal(before[k], v) for k, v in trainer.network.state_dict().items())
    # the step's loss is the partial one: the d502 slices' Posterior voxels (real hippocampus labels) count as
    # background there and U's terms are left out, unlike nnU-Net's loss with every class annotated
    with torch.no_grad():
        out = trainer.network(batch["data"])
        trainer.loss.loss.annotated = torch.tensor(expected)
        partial = trainer.loss(out, batch["target"]).item()
        trainer.loss.loss.annotated = None
        assert partial != trainer.loss(out, batch["target"]).item()
    assert "loss" in trainer.validation_step(dict(batch))


def test_unknown_case_and_missing_keys_are_clear_errors(batch, tmp_path, monkeypatch):
    trainer = merged_trainer(nnUNetTrainerM4oE, tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="Case 'd777_x' is not in this merged dataset.*sources d502, d503"):
        trainer.train_step(dict(batch, keys=["d777_x"] * 4))
    with pytest.raises(ValueError, match=r"must carry nnU-Net's case identifiers \(batch\['keys'\]\)"):
        trainer.train_step({"data": batch["data"], "target": batch["target"]})


def test_modality_gate_gets_each_cases_modality(batch, tmp_path, monkeypatch):
    trainer = merged_trainer(nnUNetTrainerM4oEModalityGate, tmp_path, monkeypatch)
    seen = []
    layer = next(iter(trainer.network.moe_layers().values()))
    assert isinstance(layer, M4oE) and layer.gate_type == "modality"
    layer.register_forward_pre_hook(lambda m, a: seen.append(None if a[1] is None else a[1].tolist()))
    trainer.train_step(dict(batch))
    assert seen == [[0, 0, 1, 1]]  # CT = expert 0, MR = expert 1 (first layer, one train step)
    # a stock predictor cannot name the modality: the network says what it needs
    trainer._batch_modality = None
    with pytest.raises(ValueError, match="gate='modality' needs the modality of every sample"):
        trainer.network(batch["data"][:1])


    # final validation: nnU-Net loads each case (dataset_class.load_case) right before predicting it
    class Cases:
        def __init__(self, folder, identifiers, folder_with_segs_from_previous_stage=None):
            pass

        def load_case(self, identifier):
            return None

    def nnunets_validation(self, save_probabilities=False):
        for case in ("d503_hippocampus_010", "d502_hippocampus_004"):
            self.dataset_class("folder", [case]).load_case(case)
            with torch.no_grad():
                self.network(batch["data"][:1])

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation", nnunets_validation)
    monkeypatch.setattr(trainer, "write_per_source_summary", lambda: None)
    trainer.dataset_class, seen[:] = Cases, []
    trainer.perform_actual_validation()
    assert seen == [[1], [0]] and trainer.dataset_class is Cases and trainer._batch_modality is None


def test_mae_weights_from_the_environment(tmp_path, monkeypatch):
    trainer = merged_trainer(nnUNetTrainerM4oE, tmp_path, monkeypatch)
    monkeypatch.delenv(MAE_WEIGHTS_ENV, raising=False)
    assert trainer.load_mae_weights_from_env() is None
    assert f"{MAE_WEIGHTS_ENV} is not set: training from scratch" in open(trainer.log_file).read()
    calls = []

    def fake_loader(network, path, modalities=None):
        calls.append((network, path, modalities))
        if path.endswith("bad.pth"):
            raise ValueError("not an M4oE MAE checkpoint (it holds a ResNet); give the file nnUNetTrainerM4oEPretrain "
                             "saved")
        return LoadReport(path, "m4oe-mae", loaded=["encoder.x"])

    monkeypatch.setattr("nnunet_moe.pretrained.m4oe_mae_weights.load_m4oe_mae_weights", fake_loader)
    monkeypatch.setenv(MAE_WEIGHTS_ENV, "/w/mae.pth")
    report = trainer.load_mae_weights_from_env()
    assert calls == [(trainer.network, "/w/mae.pth", trainer.cases.modalities if trainer.cases.merged else None)] and report.loaded == ["encoder.x"]
    assert f"{MAE_WEIGHTS_ENV}=/w/mae.pth\nLoaded mae.pth (m4oe-mae layout): 1 tensors loaded" in open(
        trainer.log_file).read()
    monkeypatch.setenv(MAE_WEIGHTS_ENV, "/w/bad.pth")
    with pytest.raises(ValueError, match=f"{MAE_WEIGHTS_ENV}=/w/bad.pth: not an M4oE MAE checkpoint"):
        trainer.load_mae_weights_from_env()
    trainer._resuming = True  # --c: the weights come from nnU-Net's checkpoint
    assert trainer.load_mae_weights_from_env() is None and len(calls) == 2


# --- per-source Dice ------------------------------------------------------------------------------------------


def test_per_source_dice_by_hand():
    dj = merged_dataset_json()
    ref_a = np.array([[0, 1, 1, 2], [0, 0, 2, 2]])  # d502 case: Posterior (2) is not annotated there
    pred_a = np.array([[0, 1, 0, 2], [2, 1, 2, 2]])
    ref_b = np.array([[1, 1, 0, 2]])
    pred_b = np.array([[1, 0, 0, 0]])
    summary = per_source_dice({"d502_hippocampus_001": (pred_a, ref_a), "d503_hippocampus_008": (pred_b, ref_b),
                               "d503_hippocampus_010": (np.zeros((2, 2)), np.zeros((2, 2)))}, dj)
    ct, mr = summary["sources"]["d502"], summary["sources"]["d503"]
    # d502: Anterior tp 1, fp 1, fn 1 -> 2/4; Posterior not scored (the CT source does not annotate it)
    assert ct["labels"] == {"Anterior": {"value": 1, "dice": 0.5, "num_cases_scored": 1}} and ct["mean_dice"] == 0.5
    assert (ct["dataset"], ct["modality"], ct["num_cases"]) == ("Dataset502_SynthCT", "CT", 1)
    # d503: case 008 Anterior tp 1 fn 1 -> 2/3, Posterior tp 0 fn 1 -> 0; case 010 empty: NaN, not counted
    assert mr["labels"]["Anterior"]["dice"] == pytest.approx(2 / 3) and mr["labels"]["Posterior"]["dice"] == 0.0
    assert mr["labels"]["Anterior"]["num_cases_scored"] == 1 and mr["num_cases"] == 2
    assert mr["mean_dice"] == pytest.approx(1 / 3)
    assert summary["per_case"]["d503_hippocampus_010"]["dice"] == {"Anterior": None, "Posterior": None}
    assert format_per_source(summary)[0] == ("Dice of source d502 (Dataset502_SynthCT, CT, 1 cases, scored on its "
                                             "own labels only): Anterior 0.5000 | mean 0.5000")
    with pytest.raises(ValueError, match="Case 'd999_q' is not in this merged dataset"):
        per_source_dice({"d999_q": (pred_b, ref_b)}, dj)
    with pytest.raises(ValueError, match=r"prediction shape \(2, 2\) differs from the reference \(1, 4\)"):
        per_source_dice({"d503_hippocampus_008": (np.zeros((2, 2)), ref_b)}, dj)


def _write(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))


def test_final_validation_writes_dice_per_source(tmp_path, monkeypatch):
    """The trainer's step after nnU-Net's validation, on prediction/reference files laid out as nnU-Net does."""
    trainer = merged_trainer(nnUNetTrainerM4oE, tmp_path, monkeypatch)
    pre = tmp_path / "pre"
    (pre / "gt_segmentations").mkdir(parents=True)
    validation = tmp_path / "fold_0" / "validation"
    validation.mkdir(parents=True)
    monkeypatch.setattr(trainer, "preprocessed_dataset_folder_base", str(pre))
    monkeypatch.setattr(trainer, "output_folder", str(tmp_path / "fold_0"))
    val = ["d502_hippocampus_004", "d503_hippocampus_010"]
    monkeypatch.setattr(trainer, "do_split", lambda: ([], val))  # nnU-Net's reads the preprocessed dataset
    ref = np.zeros((3, 4, 5), np.uint8)
    ref[1, 1:3, 1:4] = 1
    ref[2, 1:3, 1:4] = 2
    pred = copy.deepcopy(ref)
    pred[2] = 1  # Posterior missed, Anterior over-segmented
    for case in val:
        _write(pre / "gt_segmentations" / f"{case}.nii.gz", ref)
        _write(validation / f"{case}.nii.gz", pred)
    summary = trainer.write_per_source_summary()
    assert json.load(open(validation / "summary_per_source.json")) == summary
    # Anterior: predicted 6 + 20 voxels, reference 6, all 6 found: 2 * 6 / (26 + 6)
    assert summary["sources"]["d502"]["labels"] == {"Anterior": {"value": 1, "dice": 12 / 32, "num_cases_scored": 1}}
    assert summary["sources"]["d503"]["labels"]["Posterior"]["dice"] == 0.0
    log = open(trainer.log_file).read()
    assert ("Dice of source d502 (Dataset502_SynthCT, CT, 1 cases, scored on its own labels only): Anterior 0.3750"
            in log)
    assert per_source_dice_folders(str(validation), str(pre / "gt_segmentations"), trainer.dataset_json) == summary


# --- the stock commands on a real merge: plan, train (short), final validation per source, predict -------------


@pytest.mark.e2e
def test_stock_pipeline_on_a_merged_dataset(tmp_path, monkeypatch):
    """Synthetic 'CT' (bone, anterior, Posterior) + real hippocampus MR (Anterior, Posterior), merged with
    ``--alias anterior=Anterior``: the MR cases do not annotate bone. nnU-Net's data loader supplies the keys."""
    from conftest import nnunet_cmd, run
    from test_merge_datasets import CT_LABELS, synthetic_source

    from nnunet_moe.datasets.merge import merge_datasets
    from nnunet_moe.demo_dataset import write_demo_dataset
    from nnunet_moe.nnunet_paths import planning_env

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv(MAE_WEIGHTS_ENV, raising=False)
    synthetic_source(tmp_path / "nnUNet_raw", 502, "SynthCT", CT_LABELS)
    write_demo_dataset(503, "Hippo", num_test=2, num_train=6, log=lambda *a: None)
    folder = merge_datasets(611, ["502:CT", "503:MR"], ["anterior=Anterior"], name="M4oE", log=lambda *a: None)
    run([nnunet_cmd("nnUNetv2_plan_and_preprocess"), "-d", "611", "-c", "2d", "-np", "1", "-npfp", "1"],
        env=planning_env(), timeout=600)
    env = dict(os.environ, nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", nnUNet_compile="f")
    # stage 1: MAE pretraining of the encoder and its two experts; stage 2 starts from its weights file
    pretrain = "nnUNetTrainerM4oEPretrainSmall_1epochs_2iters_bs4"
    run([nnunet_cmd("nnUNetv2_train"), "611", "2d", "0", "-tr", pretrain, "-device", "cpu"], env=env)
    mae = tmp_path / "nnUNet_results" / "Dataset611_M4oE" / f"{pretrain}__nnUNetPlans__2d" / "fold_0" / WEIGHTS_NAME
    trainer = "nnUNetTrainerM4oESmall_1epochs_2iters_bs4"  # embed 24: the final validation dominates
    train = run([nnunet_cmd("nnUNetv2_train"), "611", "2d", "0", "-tr", trainer, "-device", "cpu"],
                env=dict(env, **{MAE_WEIGHTS_ENV: str(mae)}))
    assert "2 experts per M4oE layer, one per modality (CT, MR" in train.stdout
    assert f"{MAE_WEIGHTS_ENV}={mae}" in train.stdout and "missing" in train.stdout  # the gates start fresh
    fold = tmp_path / "nnUNet_results" / "Dataset611_M4oE" / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    summary = json.load(open(fold / "validation" / "summary_per_source.json"))
    splits = json.load(open(os.path.join(folder, "splits_final.json")))
    assert sorted(summary["per_case"]) == sorted(splits[0]["val"])
    assert list(summary["sources"]["d502"]["labels"]) == ["bone", "Anterior", "Posterior"]
    assert list(summary["sources"]["d503"]["labels"]) == ["Anterior", "Posterior"]  # bone: not annotated there
    assert "Dice of source d503 (Dataset503_Hippo, MR, " in train.stdout
    out = tmp_path / "predicted"
    run([nnunet_cmd("nnUNetv2_predict"), "-i", os.path.join(folder, "imagesTs"), "-o", str(out), "-d", "611", "-c",
         "2d", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env=env)
    predicted = sorted(f for f in os.listdir(out) if f.endswith(".nii.gz"))
    assert predicted == sorted(os.listdir(os.path.join(folder, "labelsTs")))
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / predicted[0]))))) <= {0, 1, 2, 3}
