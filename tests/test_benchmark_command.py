"""Tests of ``nnunet-moe benchmark`` (nnunet_moe.benchmark) on a tiny hand-made trained model.

No nnU-Net training runs here: the fixture writes nnU-Net's three folders for a synthetic dataset
(four 16x16x16 NIfTI cases, labels 0/1/2), a plans.json in nnU-Net 2.8's format with a two-stage
PlainConvUNet, splits_final.json, and a checkpoint_final.pth in nnU-Net's checkpoint format holding
the weights of a randomly initialised network built from those plans by nnU-Net's own trainer.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_moe.benchmark.command import BenchmarkOptions, add_benchmark_parser, benchmark, run_benchmark
from nnunet_moe.benchmark.models import trained_trainers
from nnunet_moe.benchmark.modes import MODES, resolve_modes
from nnunet_moe.benchmark.runner import benchmark_model
from nnunet_moe.benchmark.cost import count_flops, count_parameters
from nnunet_moe.benchmark.metrics import case_metrics

DATASET_ID = 987
DATASET = f"Dataset{DATASET_ID}_TinyBench"
CONFIG = "3d_fullres"
LABELS = {"background": 0, "left": 1, "right": 2}
CASES = [f"case_{i}" for i in range(4)]
VAL_CASES = CASES[2:]
SIDE = 16


def tiny_plans() -> dict:
    """nnU-Net 2.8 plans with one 3d_fullres configuration: 16^3 patch, PlainConvUNet 4/8 features."""
    conv3 = [[3, 3, 3], [3, 3, 3]]
    return {
        "dataset_name": DATASET,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [SIDE] * 3,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIG: {
            "data_identifier": "nnUNetPlans_3d_fullres",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2,
            "patch_size": [SIDE] * 3,
            "median_image_size_in_voxels": [float(SIDE)] * 3,
            "spacing": [1.0, 1.0, 1.0],
            "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": conv3, "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1, 1],
                    "n_conv_per_stage_decoder": [1], "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3.0, "mean": 2.0, "median": 2.0, "min": 1.0, "percentile_00_5": 1.0, "percentile_99_5": 3.0,
            "std": 0.5}},
    }


def dataset_json(labels: dict = LABELS) -> dict:
    return {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": len(CASES), "file_ending": ".nii.gz"}


def build_network(plans: dict, ds_json: dict, seed: int = 0) -> torch.nn.Module:
    """The network nnU-Net's predictor rebuilds for trainer nnUNetTrainer from these plans."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    torch.manual_seed(seed)
    return nnUNetTrainer.build_network_architecture(
        manager, manager.get_configuration(CONFIG), 1, manager.get_label_manager(ds_json).num_segmentation_heads,
        enable_deep_supervision=False)


def balance_classes(network: torch.nn.Module, raw_dataset: str) -> None:
    """Shift the output layer's bias so that every class wins somewhere on a training image.

    A randomly initialised network predicts one class almost everywhere, which would hide pipeline
    errors (a flipped axis, a wrong normalisation) from the comparison with stock nnU-Net; after the
    shift its label map depends on the image content. (Training instead takes minutes on 2 CPU cores.)
    """
    image = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw_dataset, "imagesTr", f"{CASES[0]}_0000.nii.gz")))
    x = torch.from_numpy((image - image.mean()) / image.std())[None, None].float()  # ZScoreNormalization
    network.eval()
    with torch.no_grad():
        logits = network(x)
        network.decoder.seg_layers[-1].bias -= logits.mean(dim=(0, 2, 3, 4))


def write_model(results: str, trainer: str, plans: dict, ds_json: dict, checkpoint: str = "checkpoint_final.pth",
                raw_dataset: str | None = None):
    folder = os.path.join(results, DATASET, f"{trainer}__nnUNetPlans__{CONFIG}")
    os.makedirs(os.path.join(folder, "fold_0"))
    for name, content in (("plans.json", plans), ("dataset.json", ds_json)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f)
    network = build_network(plans, ds_json)
    if raw_dataset is not None:
        balance_classes(network, raw_dataset)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": plans, "configuration": CONFIG, "fold": 0, "dataset_json": ds_json},
                "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 1},
               os.path.join(folder, "fold_0", checkpoint))
    return folder


def write_case(image_path: str, label_path: str, seed: int):
    rng = np.random.default_rng(seed)
    label = np.zeros((SIDE,) * 3, dtype=np.uint8)
    label[3:8, 4:10, 3:9] = 1
    label[9:14, 6:12, 8:13] = 2
    # strictly positive everywhere: nnU-Net crops to the nonzero region, which is then the whole image
    image = (1.0 + label + 0.3 * rng.random(label.shape)).astype(np.float32)
    for array, path in ((image, image_path), (label, label_path)):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(itk, path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    paths = {var: str(root / var) for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    raw = os.path.join(paths["nnUNet_raw"], DATASET)
    pre = os.path.join(paths["nnUNet_preprocessed"], DATASET)
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(raw, sub))
    os.makedirs(pre)
    for i, case in enumerate(CASES):
        write_case(os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz"), os.path.join(raw, "labelsTr", f"{case}.nii.gz"),
                   seed=i)
    plans = tiny_plans()
    for path, content in ((os.path.join(raw, "dataset.json"), dataset_json()),
                          (os.path.join(pre, "dataset.json"), dataset_json()),
                          (os.path.join(pre, "nnUNetPlans.json"), plans),
                          (os.path.join(pre, "splits_final.json"), [{"train": CASES[:2], "val": VAL_CASES}])):
        with open(path, "w") as f:
            json.dump(content, f)
    write_model(paths["nnUNet_results"], "nnUNetTrainer", plans, dataset_json(), raw_dataset=raw)
    # a model trained on another label set: two classes instead of three
    write_model(paths["nnUNet_results"], "nnUNetTrainerOtherLabels", plans,
                dataset_json({"background": 0, "hippocampus": 1}))
    # an unfinished training: only checkpoint_best.pth
    write_model(paths["nnUNet_results"], "nnUNetTrainerUnfinished", plans, dataset_json(), "checkpoint_best.pth")
    paths["root"] = str(root)
    paths["raw_dataset"] = raw
    return paths


@pytest.fixture
def nnunet_env(folders, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, folders[var])
    return folders


def parse(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nnunet-moe")
    add_benchmark_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["benchmark", *argv])


def forward_flops(plans: dict) -> int:
    network = build_network(plans, dataset_json()).eval()
    return count_flops(network, torch.zeros(1, 1, SIDE, SIDE, SIDE))


def read_csv(path: str) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_benchmark_command_reports_partial_results_and_matches_stock_nnunet(nnunet_env, tmp_path, capsys):
    out = str(tmp_path / "bench")
    args = parse(["-d", str(DATASET_ID), "-c", CONFIG, "-f", "0", "-o", out, "--no-progress",
                  "-tr", "nnUNetTrainer", "nnUNetTrainerMissing", "nnUNetTrainerOtherLabels"])
    assert run_benchmark(args) == 0
    printed = capsys.readouterr().out

    for name in ("report.md", "results.csv", "results.json", "dice_vs_time.png", "per_case.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    # the missing trainer is named with its folder; the other label set is named with both label sets
    missing_folder = os.path.join(nnunet_env["nnUNet_results"], DATASET, f"nnUNetTrainerMissing__nnUNetPlans__{CONFIG}")
    assert f"no results folder {missing_folder}" in printed
    assert "nnUNetTrainerOtherLabels: its labels {'background': 0, 'hippocampus': 1}" in printed
    assert "differ from the reference labels {'background': 0, 'left': 1, 'right': 2}" in printed
    assert "| nnUNetTrainer | sliding_window |" in printed  # the Markdown table on the terminal

    rows = read_csv(os.path.join(out, "results.csv"))
    assert [(r["model"], r["mode"], r["label"], r["class_name"]) for r in rows] == [
        ("nnUNetTrainer", "sliding_window", "1", "left"), ("nnUNetTrainer", "sliding_window", "2", "right")]
    plans = tiny_plans()
    network = build_network(plans, dataset_json())
    for row in rows:
        assert 0.0 <= float(row["dice"]) <= 1.0 and math.isfinite(float(row["hd95"]))
        assert int(row["params"]) == count_parameters(network)
        # one 16^3 patch per case, times 8 mirrored passes (TTA over 3 axes)
        assert int(row["flops"]) == 8 * forward_flops(plans) > 0
        assert float(row["seconds_per_case"]) > 0 and float(row["peak_memory_mb"]) > 0

    # predictions equal nnU-Net's stock single-case prediction; Dice is recomputed from them
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, device=torch.device("cpu"),
                                perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(
        os.path.join(nnunet_env["nnUNet_results"], DATASET, f"nnUNetTrainer__nnUNetPlans__{CONFIG}"), (0,))
    io, dice = SimpleITKIO(), {1: [], 2: []}
    for case in VAL_CASES:
        image, props = io.read_images([os.path.join(nnunet_env["raw_dataset"], "imagesTr", f"{case}_0000.nii.gz")])
        stock = predictor.predict_single_npy_array(image, props)
        ours, _ = io.read_seg(os.path.join(out, "predictions", "nnUNetTrainer__sliding_window", f"{case}.nii.gz"))
        np.testing.assert_array_equal(ours[0], stock)
        assert all((stock == c).sum() > 100 for c in (0, 1, 2))  # an image-dependent map, not one class
        reference, _ = io.read_seg(os.path.join(nnunet_env["raw_dataset"], "labelsTr", f"{case}.nii.gz"))
        for label, values in case_metrics(stock, reference[0], [1, 2], (1.0, 1.0, 1.0)).items():
            dice[label].append(values["dice"])
    for row in rows:
        assert float(row["dice"]) == pytest.approx(np.mean(dice[int(row["label"])]), abs=1e-9)

    with open(os.path.join(out, "per_case.json")) as f:
        per_case = json.load(f)
    assert [c["case"] for c in per_case["cases"]] == VAL_CASES
    assert per_case["settings"]["cases"] == VAL_CASES and len(per_case["problems"]) == 2


def test_output_folder_is_never_overwritten_and_no_tta_counts_one_pass(nnunet_env, tmp_path):
    out = str(tmp_path / "bench")
    common = dict(dataset=str(DATASET_ID), configuration=CONFIG, trainers=["nnUNetTrainer"], fold=0, out=out,
                  progress=False, log=lambda *a: None)
    first = benchmark(**common)
    with open(first.paths["csv"]) as f:
        first_csv = f.read()
    second = benchmark(**common, tta=False)
    assert first.out_dir == out and second.out_dir == out + "_2"
    with open(os.path.join(out, "results.csv")) as f:
        assert f.read() == first_csv  # the first run's files are untouched
    flops = {r["flops"] for r in second.rows}
    assert flops == {forward_flops(tiny_plans())}  # no mirroring: one forward pass of the single patch
    # default folder: inside the dataset's results folder, also suffixed when it exists
    default = benchmark(**{**common, "out": None})
    assert default.out_dir == os.path.join(nnunet_env["nnUNet_results"], DATASET, f"benchmark_{CONFIG}_fold0")
    assert os.path.isfile(os.path.join(default.out_dir, "results.json"))


def test_fold_without_checkpoint_names_the_file_and_no_model_fails(nnunet_env, tmp_path):
    with pytest.raises(RuntimeError) as error:
        benchmark(str(DATASET_ID), CONFIG, ["nnUNetTrainerUnfinished"], 0, out=str(tmp_path / "b"), progress=False,
                  log=lambda *a: None)
    message = str(error.value)
    path = os.path.join(nnunet_env["nnUNet_results"], DATASET, f"nnUNetTrainerUnfinished__nnUNetPlans__{CONFIG}",
                        "fold_0", "checkpoint_final.pth")
    assert message.startswith("no model could be evaluated")
    assert f"no checkpoint {path}" in message and "--checkpoint checkpoint_best.pth" in message
    assert not os.path.exists(tmp_path / "b")  # nothing written when nothing was evaluated
    with pytest.raises(RuntimeError, match="no folder fold_3 in .*folds present: fold_0"):
        benchmark(str(DATASET_ID), CONFIG, ["nnUNetTrainer"], 3, images=os.path.join(nnunet_env["raw_dataset"],
                  "imagesTr"), labels=os.path.join(nnunet_env["raw_dataset"], "labelsTr"), progress=False,
                  log=lambda *a: None)


def test_image_and_label_folders(nnunet_env, tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    write_case(str(images / "x_0000.nii.gz"), str(labels / "x.nii.gz"), seed=7)
    write_case(str(images / "y_0000.nii.gz"), str(tmp_path / "unused.nii.gz"), seed=8)
    with pytest.raises(FileNotFoundError, match=r"1 case\(s\) have no label file in .*labels: y.nii.gz"):
        benchmark(str(DATASET_ID), CONFIG, ["nnUNetTrainer"], 0, images=str(images), labels=str(labels),
                  progress=False, log=lambda *a: None)
    os.remove(images / "y_0000.nii.gz")
    result = benchmark(DATASET, CONFIG, ["nnUNetTrainer"], 0, images=str(images), labels=str(labels),
                       out=str(tmp_path / "out"), progress=False, log=lambda *a: None)
    assert [r["case"] for r in result.per_case] == ["x"]


def test_environment_and_dataset_errors(nnunet_env, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset id 555: no folder Dataset555_\\* in nnUNet_raw="):
        benchmark("555", CONFIG, ["nnUNetTrainer"], 0, progress=False, log=lambda *a: None)
    with pytest.raises(ValueError, match="required without --demo: -c, -f"):
        run_benchmark(parse(["-d", "987", "-tr", "nnUNetTrainer"]))
    monkeypatch.delenv("nnUNet_results")
    with pytest.raises(RuntimeError, match="nnUNet_results is not set"):
        benchmark(str(DATASET_ID), CONFIG, ["nnUNetTrainer"], 0, progress=False, log=lambda *a: None)
    # --demo with nothing trained: the message says what to run
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.delenv(var)
    with pytest.raises(RuntimeError, match="Run `nnunet-moe demo` first"):
        run_benchmark(parse(["--demo", "--work-dir", str(tmp_path / "nothing")]))


def test_demo_scan_finds_trained_trainers(nnunet_env):
    assert trained_trainers(nnunet_env["nnUNet_results"], DATASET, "nnUNetPlans", CONFIG, "0") == [
        "nnUNetTrainer", "nnUNetTrainerOtherLabels"]
    assert trained_trainers(nnunet_env["nnUNet_results"], DATASET, "nnUNetPlans", CONFIG, "0",
                            "checkpoint_best.pth") == ["nnUNetTrainerUnfinished"]
    assert trained_trainers(nnunet_env["nnUNet_results"], DATASET, "nnUNetPlans", "2d", "0") == []


def test_modes_plain_unet_and_nmsw(nnunet_env, tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_moe.benchmark.cases import Case
    from nnunet_moe.benchmark.models import load_predictor
    from nnunet_moe.networks.nmsw_plans import build_default_nmsw_from_plans

    folder = os.path.join(nnunet_env["nnUNet_results"], DATASET, f"nnUNetTrainer__nnUNetPlans__{CONFIG}")
    unet_predictor = load_predictor(folder, "0", BenchmarkOptions())
    assert resolve_modes(unet_predictor.network, ["auto"]) == ["sliding_window"]
    assert "needs an NMSW-Net model" in MODES["nmsw"].unavailable_reason(unet_predictor)

    plans = PlansManager(tiny_plans())
    configuration = plans.get_configuration(CONFIG)
    torch.manual_seed(0)
    nmsw = build_default_nmsw_from_plans(plans, configuration, dataset_json(), k_infer=2)
    assert resolve_modes(nmsw, ["auto"]) == ["nmsw"]
    assert resolve_modes(nmsw, ["sliding_window", "auto"]) == ["sliding_window", "nmsw"]

    # the sliding-window extension point: same NMSW weights, stock sliding window over the local network
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.manual_initialization(nmsw, plans, configuration, [copy.deepcopy(nmsw.state_dict())], dataset_json(),
                                    "nnUNetTrainer", (0, 1, 2))
    raw = nnunet_env["raw_dataset"]
    cases = [Case(c, [os.path.join(raw, "imagesTr", f"{c}_0000.nii.gz")], os.path.join(raw, "labelsTr", f"{c}.nii.gz"))
             for c in VAL_CASES[:1]]
    rows, records = benchmark_model("NMSW", MODES["sliding_window"], predictor, cases, BenchmarkOptions(), [1, 2],
                                    {1: "left", 2: "right"}, str(tmp_path), ".nii.gz", None, lambda *a: None)
    assert predictor.network is nmsw  # restored after the mode
    assert {r["params"] for r in rows} == {count_parameters(nmsw.local_net)} != {count_parameters(nmsw)}
    assert records[0]["flops"] == 8 * count_flops(nmsw.local_net.eval(), torch.zeros(1, 1, SIDE, SIDE, SIDE))
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)


def test_untrained_model_from_the_dataset_plans_is_costed_not_scored(nnunet_env, tmp_path):
    result = benchmark(str(DATASET_ID), CONFIG, [], 0, untrained=["nnUNetTrainer"], out=str(tmp_path / "u"),
                       progress=False, log=lambda *a: None)
    assert {r["model"] for r in result.rows} == {"nnUNetTrainer (untrained)"}
    assert all(r["dice"] is None or math.isnan(r["dice"]) for r in result.rows)
    # the network of the plans, the same FLOPs as the trained one: one 16^3 patch, 8 mirrored passes
    assert {r["flops"] for r in result.rows} == {8 * forward_flops(tiny_plans())}
    assert {r["patches_per_case"] for r in result.rows} == {8}
    assert [c["case"] for c in result.per_case] == VAL_CASES and all(c["patches"] == 8 for c in result.per_case)
    assert "untrained (seeded, seed 0) weights for nnUNetTrainer" in open(result.paths["markdown"]).read()
