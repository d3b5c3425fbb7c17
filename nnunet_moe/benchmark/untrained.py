"""Models with untrained (seeded) weights, built from nnU-Net plans: cost comparisons without training.

``untrained_model`` builds a trainer's network from a plans file exactly as nnU-Net's predictor
rebuilds it for a checkpoint (``build_network_architecture``), with ``torch.manual_seed(seed)``
weights; for our trainers from the plans as training adapts them (``prepare_plans``: the patch size
the architecture needs), so the network is the one a training run would save. Only time, FLOPs,
patches and memory mean something then, so such models are not scored (Dice/HD95/NSD "n/a"). An
NMSW network is made to run exactly K local patches (``infer_only_foreground`` and
``mask_background`` off): untrained, its global net sees no foreground and would skip every local pass.

``plan_cases`` plans cases that belong to no nnU-Net dataset: it writes them (symlinked) as a raw
dataset in a temporary folder, labels ``label_1..label_<max>`` from the largest value in the label
files, one channel name ``image`` per channel (z-score normalisation), and runs the stock
``nnUNetv2_plan_and_preprocess --no_pp`` there.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess

from nnunet_moe.benchmark.models import Model, load_json, new_predictor
from nnunet_moe.networks.unwrap import unwrap_network
from nnunet_moe.nnunet_paths import NNUNET_FOLDER_VARS, nnunet_command, planning_env

PLANNED_DATASET_ID = 987  # any id: the temporary folders hold no other dataset


def untrained_model(trainer: str, plans_file: str, dataset_json_path: str, configuration: str, seed: int) -> Model:
    return Model(f"{trainer} (untrained)", dataset_json_path, f"untrained {trainer} (seed {seed}) from {plans_file}",
                 lambda options: untrained_predictor(trainer, plans_file, dataset_json_path, configuration, seed,
                                                     options), scored=False)


def untrained_predictor(trainer: str, plans_file: str, dataset_json_path: str, configuration: str, seed: int,
                        options):
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_moe.benchmark.modes import is_nmsw_network

    with contextlib.redirect_stdout(io.StringIO()):  # the trainer search prints line by line
        trainer_class = recursive_find_trainer_class_by_name(trainer)
        predictor = new_predictor(options)
    plans = load_json(plans_file)
    if hasattr(trainer_class, "prepare_plans"):  # ours: the patch size training would use (and save with the model)
        plans, _ = trainer_class.prepare_plans(plans, configuration)
    plans_manager, dataset_json = PlansManager(plans), load_json(dataset_json_path)
    configuration_manager = plans_manager.get_configuration(configuration)
    torch.manual_seed(seed)
    network = trainer_class.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    if is_nmsw_network(network):
        unwrap_network(network).infer_only_foreground = False
        unwrap_network(network).mask_background = False
    mirror_axes = tuple(range(len(configuration_manager.patch_size)))  # nnU-Net's trainers mirror every axis
    predictor.manual_initialization(network, plans_manager, configuration_manager, [network.state_dict()],
                                    dataset_json, trainer, mirror_axes)
    return predictor


def plan_cases(cases: list, file_ending: str, channels: int, configuration: str, work: str) -> tuple:
    """Stock nnU-Net plans for ``cases`` in the folder ``work``: (plans file, dataset.json file)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    name = f"Dataset{PLANNED_DATASET_ID}_Planned"
    folders = {var: os.path.join(work, var) for var in NNUNET_FOLDER_VARS}
    raw = os.path.join(folders["nnUNet_raw"], name)
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(raw, sub))
    reader = determine_reader_writer_from_file_ending(file_ending, cases[0].label_file)()
    max_label = 1
    for case in cases:
        for image in case.image_files:
            os.symlink(os.path.abspath(image), os.path.join(raw, "imagesTr", os.path.basename(image)))
        os.symlink(os.path.abspath(case.label_file), os.path.join(raw, "labelsTr", case.identifier + file_ending))
        max_label = max(max_label, int(reader.read_seg(case.label_file)[0].max()))
    with open(os.path.join(raw, "dataset.json"), "w") as f:
        json.dump({"channel_names": {str(c): "image" for c in range(channels)},
                   "labels": {"background": 0, **{f"label_{i}": i for i in range(1, max_label + 1)}},
                   "numTraining": len(cases), "file_ending": file_ending}, f)
    command = [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(PLANNED_DATASET_ID), "-c", configuration,
               "--no_pp", "-npfp", "2"]
    process = subprocess.run(command, env=planning_env(**folders), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stdout[-3000:]}")
    preprocessed = os.path.join(folders["nnUNet_preprocessed"], name)
    return os.path.join(preprocessed, "nnUNetPlans.json"), os.path.join(preprocessed, "dataset.json")
