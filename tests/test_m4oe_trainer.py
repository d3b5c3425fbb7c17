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

from nnunet_moe.datasets.evaluation import (case_dice_from_nnunet_summary, format_per_source, per_source_dice,
                                            per_source_markdown)
from nnunet_moe.datasets.metadata import MERGE_KEY
from nnunet_moe.layers.m4oe import M4oE
from nnunet_moe.pretrained.load_report import LoadReport
from nnunet_moe.pretrained.m4oe_mae_weights import WEIGHTS_NAME
from nnunet_moe.training.m4oe_trainer import (MAE_WEIGHTS_ENV, nnUNetTrainerM4oE, nnUNetTrainerM4oEModalityGate,
                                              nnUNetTrainerM4oESelect)
from nnunet_moe.datasets.metadata import PLANS_KEY
from nnunet_moe.training.partial_labels import PartialLabelDCandCELoss

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
    trainer._set_modality(None)
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
    assert seen == [[1], [0]] and trainer.dataset_class is Cases and trainer._modality.value is None


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
    nan = float("nan")
    summary = per_source_dice({"d502_hippocampus_001": {1: 0.5, 2: 0.8},  # Posterior (2) not annotated in d502
                               "d503_hippocampus_008": {1: 2 / 3, 2: 0.0},
                               "d503_hippocampus_010": {1: nan, 2: nan}}, dj)  # in neither: not counted
    ct, mr = summary["sources"]["d502"], summary["sources"]["d503"]
    assert ct["labels"] == {"Anterior": {"value": 1, "dice": 0.5, "num_cases_scored": 1}} and ct["mean_dice"] == 0.5
    assert (ct["dataset"], ct["modality"], ct["num_cases"]) == ("Dataset502_SynthCT", "CT", 1)
    assert mr["labels"]["Anterior"]["dice"] == pytest.approx(2 / 3) and mr["labels"]["Posterior"]["dice"] == 0.0
    assert mr["labels"]["Anterior"]["num_cases_scored"] == 1 and mr["num_cases"] == 2
    assert mr["mean_dice"] == pytest.approx(1 / 3)
    assert summary["per_case"]["d503_hippocampus_010"]["dice"] == {"Anterior": None, "Posterior": None}
    assert format_per_source(summary)[0] == ("Dice of source d502 (Dataset502_SynthCT, CT, 1 cases, scored on its "
                                             "own labels only): Anterior 0.5000 | mean 0.5000")
    table = per_source_markdown({"m": summary}).splitlines()
    assert table[0] == "| model | source | modality | cases | Anterior | Posterior | mean |"
    assert table[2] == "| m | d502 (Dataset502_SynthCT) | CT | 1 | 0.5000 | - | 0.5000 |"
    assert table[3] == "| m | d503 (Dataset503_Hippo) | MR | 2 | 0.6667 | 0.0000 | 0.3333 |"
    with pytest.raises(ValueError, match="Case 'd999_q' is not in this merged dataset"):
        per_source_dice({"d999_q": {1: 0.5}}, dj)
    with pytest.raises(ValueError, match=r"case 'd503_hippocampus_008': no Dice for label 'Posterior' \(value 2\)"):
        per_source_dice({"d503_hippocampus_008": {1: 0.5}}, dj)


def _write(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))


def test_final_validation_writes_dice_per_source(tmp_path, monkeypatch):
    """The trainer's step after nnU-Net's validation, on nnU-Net's own summary.json of files laid out as it does."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    trainer = merged_trainer(nnUNetTrainerM4oE, tmp_path, monkeypatch)
    gt, validation = tmp_path / "pre" / "gt_segmentations", tmp_path / "fold_0" / "validation"
    gt.mkdir(parents=True)
    validation.mkdir(parents=True)
    monkeypatch.setattr(trainer, "output_folder", str(tmp_path / "fold_0"))
    val = ["d502_hippocampus_004", "d503_hippocampus_010"]
    monkeypatch.setattr(trainer, "do_split", lambda: ([], val))  # nnU-Net's reads the preprocessed dataset
    ref = np.zeros((3, 4, 5), np.uint8)
    ref[1, 1:3, 1:4] = 1
    ref[2, 1:3, 1:4] = 2
    pred = copy.deepcopy(ref)
    pred[2] = 1  # Posterior missed, Anterior over-segmented
    for case in val:
        _write(gt / f"{case}.nii.gz", ref)
        _write(validation / f"{case}.nii.gz", pred)
    compute_metrics_on_folder(str(gt), str(validation), str(validation / "summary.json"), SimpleITKIO(), ".nii.gz",
                              [1, 2], num_processes=1)
    summary = trainer.write_per_source_summary()
    assert json.load(open(validation / "summary_per_source.json")) == summary
    # Anterior: predicted 6 + 20 voxels, reference 6, all 6 found: 2 * 6 / (26 + 6)
    assert summary["sources"]["d502"]["labels"] == {"Anterior": {"value": 1, "dice": 12 / 32, "num_cases_scored": 1}}
    assert summary["sources"]["d503"]["labels"]["Posterior"]["dice"] == 0.0
    log = open(trainer.log_file).read()
    assert ("Dice of source d502 (Dataset502_SynthCT, CT, 1 cases, scored on its own labels only): Anterior 0.3750"
            in log)
    nnunet_summary = json.load(open(validation / "summary.json"))
    with pytest.raises(ValueError, match="no entry for the case.s. d503_x"):
        case_dice_from_nnunet_summary(nnunet_summary, ".nii.gz", {"d503_x", *val})


def test_predict_merged_picks_the_normalisation_and_refuses_what_it_cannot():
    from nnunet_moe.inference.merged_prediction import _check_experts, normalisation_source

    meta = merged_dataset_json()[MERGE_KEY]
    meta["sources"]["d502"]["normalisation"] = {"scheme": "CTNormalization", "channels": [{"mean": 1.0}]}
    meta["sources"]["d503"]["normalisation"] = {"scheme": "ZScoreNormalization", "use_mask_for_norm": False}
    assert normalisation_source(meta, "MR") == "d503" and normalisation_source(meta, "CT", "d502") == "d502"
    with pytest.raises(ValueError, match="--source 'd9' is not a source .* d502 \\(Dataset502_SynthCT, CT\\)"):
        normalisation_source(meta, "CT", "d9")
    with pytest.raises(ValueError, match="--source d503 is MR, not CT"):
        normalisation_source(meta, "CT", "d503")
    meta["sources"]["d504"] = {**meta["sources"]["d502"], "dataset": "Dataset504_B"}
    assert normalisation_source(meta, "CT") == "d502"  # same parameters: either is right
    meta["sources"]["d504"]["normalisation"] = {"scheme": "CTNormalization", "channels": [{"mean": 2.0}]}
    with pytest.raises(ValueError, match="the sources d502, d504 were normalised with different parameters"):
        normalisation_source(meta, "CT")
    del meta["sources"]["d502"], meta["sources"]["d504"]
    with pytest.raises(ValueError, match="modality 'CT': this model's merged dataset has no CT source"):
        normalisation_source(meta, "CT")
    assert _check_experts({PLANS_KEY: {"modalities": ["MR"]}}, meta, "plans.json") == ["MR"]
    with pytest.raises(ValueError, match=r"plans.json: the model's experts stand for \['CT', 'MR'\]"):
        _check_experts({PLANS_KEY: {"modalities": ["CT", "MR"]}}, meta, "plans.json")


# --- the stock commands on a real merge: plan, train (short), final validation per source, predict -------------


def two_sources(tmp_path) -> tuple:
    """Dataset 502 (CT) and 503 (MR) in ``$nnUNet_raw``; returns (aliases, the MR source's folder, what they are).

    With ``../shared/data``: 6 BTCV CT + 1 held out and 6 CHAOS T2 MR + 1 held out (real data of two modalities
    sharing liver, kidneys and spleen), resampled to 4 x 4 x 8 mm to fit a test. Without it (the suite must
    pass anywhere): synthetic 'CT' (bone, anterior, Posterior) + the bundled hippocampus MR (Anterior,
    Posterior) with ``--alias anterior=Anterior``. Either way the MR cases do not annotate every CT label."""
    from test_merge_datasets import CT_LABELS, synthetic_source

    from nnunet_moe.benchmark.shared_data import find_shared_data, write_shared_dataset
    from nnunet_moe.demo_dataset import write_demo_dataset

    shared = find_shared_data(os.path.dirname(os.path.abspath(__file__)))
    quiet = lambda *a: None  # noqa: E731
    if shared is not None:
        write_shared_dataset(shared, "btcv", 502, num_train=6, num_test=1, spacing=(4.0, 4.0, 8.0), log=quiet)
        mr = write_shared_dataset(shared, "chaos_t2", 503, num_train=6, num_test=1, spacing=(4.0, 4.0, 8.0),
                                  log=quiet)
        return [], mr, "real BTCV CT + CHAOS T2 MR"
    synthetic_source(tmp_path / "nnUNet_raw", 502, "SynthCT", CT_LABELS)
    mr = write_demo_dataset(503, "Hippo", num_test=2, num_train=6, log=quiet).folder
    return ["anterior=Anterior"], mr, "synthetic CT + hippocampus MR"


@pytest.mark.e2e
def test_stock_pipeline_on_a_merged_dataset(tmp_path, monkeypatch):
    """Merge a CT and an MR source (``two_sources``: real BTCV + CHAOS where ``../shared`` is present), plan,
    MAE stage 1, stage 2 from its weights, per-source validation, predict (stock and from raw MR images),
    benchmark per source. nnU-Net's data loader supplies the keys."""
    from conftest import nnunet_cmd, run

    from nnunet_moe.datasets.merge import merge_datasets
    from nnunet_moe.nnunet_paths import planning_env

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv(MAE_WEIGHTS_ENV, raising=False)
    aliases, mr_source, what = two_sources(tmp_path)
    print(f"sources: {what}")
    folder = merge_datasets(611, ["502:CT", "503:MR"], aliases, name="M4oE", log=lambda *a: None)
    merged_json = json.load(open(os.path.join(folder, "dataset.json")))
    union = {n: v for n, v in merged_json["labels"].items() if v}
    own = {k: sorted(src["labels"].values(), key=union.get) for k, src in merged_json[MERGE_KEY]["sources"].items()}
    assert set(own["d503"]) < set(own["d502"])  # labels the MR source does not annotate
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
    assert {k: list(v["labels"]) for k, v in summary["sources"].items()} == own  # each on its own labels only
    assert f"Dice of source d503 ({os.path.basename(mr_source)}, MR, " in train.stdout
    out = tmp_path / "predicted"
    run([nnunet_cmd("nnUNetv2_predict"), "-i", os.path.join(folder, "imagesTs"), "-o", str(out), "-d", "611", "-c",
         "2d", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env=env)
    predicted = sorted(f for f in os.listdir(out) if f.endswith(".nii.gz"))
    assert predicted == sorted(os.listdir(os.path.join(folder, "labelsTs")))
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / predicted[0]))))) <= {0, *union.values()}
    # new raw MR images (the MR source's own imagesTs): normalised as d503, the same segmentations
    from nnunet_moe.cli import main

    fresh = tmp_path / "from_raw"
    raw_mr = os.path.join(mr_source, "imagesTs")
    assert main(["predict-merged", "-i", str(raw_mr), "-o", str(fresh), "-d", "611", "-tr", trainer,
                 "--modality", "MR"]) == 0
    raw_cases = sorted(f for f in os.listdir(fresh) if f.endswith(".nii.gz"))
    assert raw_cases and [f"d503_{c}" for c in raw_cases] == [p for p in predicted if p.startswith("d503_")]
    for case in raw_cases:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(fresh / case))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"d503_{case}"))))
    assert main(["predict-merged", "-i", str(raw_mr), "-o", str(tmp_path / "x"), "-d", "611", "-tr", trainer,
                 "--modality", "MR", "--source", "d502"]) == 2 and not (tmp_path / "x").exists()
    # nnunet-moe benchmark on the held-out cases: Dice per source, the same per case as nnU-Net's evaluation
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_moe.benchmark.command import benchmark

    result = benchmark("611", "2d", [trainer], 0, images=os.path.join(folder, "imagesTs"),
                       labels=os.path.join(folder, "labelsTs"), out=str(tmp_path / "bench"), progress=False,
                       memory=False, flops=False, log=lambda *a: None)
    bench = json.load(open(result.paths["per_source_json"]))[f"{trainer} (sliding_window)"]
    assert f"| d503 ({os.path.basename(mr_source)}) | MR |" in open(result.paths["per_source"]).read()
    assert list(bench["sources"]["d503"]["labels"]) == own["d503"]
    written = tmp_path / "bench" / "predictions" / f"{trainer}__sliding_window"
    compute_metrics_on_folder(os.path.join(folder, "labelsTs"), str(written), str(tmp_path / "s.json"), SimpleITKIO(),
                              ".nii.gz", sorted(union.values()), num_processes=1)
    ours = per_source_dice(case_dice_from_nnunet_summary(json.load(open(tmp_path / "s.json")), ".nii.gz"),
                           merged_json)["per_case"]
    assert sorted(ours) == sorted(bench["per_case"]) and len(ours) == len(predicted)
    for case, scored in ours.items():
        for name, dice in scored["dice"].items():
            if dice is not None:  # both empty: nnU-Net NaN, the benchmark 1.0 (its documented convention)
                assert bench["per_case"][case]["dice"][name] == pytest.approx(dice), (case, name)
