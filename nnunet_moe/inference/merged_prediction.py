"""``nnunet-moe predict-merged``: a model trained on a merged dataset segments new raw images of one modality.

A merged dataset (``nnunet-moe merge-datasets``) has one channel ``noNorm``: its cases were written already
normalised as nnU-Net would normalise them in their own source dataset (``datasets.normalisation``). A new
raw image needs the same step before nnU-Net's predictor sees it, and that step depends on the modality
(CT: the source's foreground statistics; MR: a per-image z-score), which the image file does not say.

:func:`predict_merged` takes the modality (and, where several sources of that modality were normalised
differently, the source), reads the normalisation record from the model's own ``dataset.json`` (nnU-Net
copies it into the results folder), writes the normalised images into a temporary folder and predicts them
with nnU-Net's ``nnUNetPredictor`` (its preprocessing, sliding window, mirroring and export). For a model
whose gate is conditioned on the modality (``nnUNetTrainerM4oEModalityGate``) it also hands that modality's
expert index to the network (``networks.modality_keyword``, a forward pre-hook removed afterwards); the stock
``nnUNetv2_predict`` cannot, so such a model needs this command.

Refused before anything is written, each naming the value and what to do: a model folder that is not of a
merged dataset; a modality the merged dataset has no source of; an unknown source, or one of another
modality; a modality with several differently normalised sources and no ``--source``; a model whose experts
(``datasets.metadata.PLANS_KEY`` in its plans) do not match the merged dataset's modalities; input images
the model cannot take (``input_checks``).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from nnunet_moe.datasets.metadata import expert_modalities, merge_metadata, modality_order
from nnunet_moe.networks.modality_keyword import ModalityKeyword

__all__ = ["normalisation_source", "predict_merged", "add_predict_merged_parser"]


def normalisation_source(meta: dict, modality: str, source: str | None = None) -> str:
    """The source whose normalisation a new ``modality`` image gets (the key, e.g. ``d502``)."""
    sources = meta["sources"]
    listing = ", ".join(f"{k} ({s['dataset']}, {s['modality']})" for k, s in sorted(sources.items()))
    if source is not None:
        if source not in sources:
            raise ValueError(f"--source {source!r} is not a source of this model's merged dataset; its sources are "
                             f"{listing}.")
        if sources[source]["modality"] != modality:
            raise ValueError(f"--source {source} is {sources[source]['modality']}, not {modality}: give a {modality} "
                             f"source or the modality of {source}. Sources: {listing}.")
        return source
    candidates = sorted(k for k, s in sources.items() if s["modality"] == modality)
    if not candidates:
        raise ValueError(f"modality {modality!r}: this model's merged dataset has no {modality} source (sources: "
                         f"{listing}), so it has no normalisation for it. Give one of "
                         f"{', '.join(modality_order(meta))}, or merge a {modality} dataset in and retrain.")
    if len({json.dumps(sources[k]["normalisation"], sort_keys=True) for k in candidates}) > 1:
        raise ValueError(f"modality {modality}: the sources {', '.join(candidates)} were normalised with different "
                         f"parameters, so the image's source decides; pass --source with one of them.")
    return candidates[0]


def _check_experts(plans: dict, meta: dict, where: str) -> list:
    experts, merged = expert_modalities(plans), modality_order(meta)
    if experts and experts != merged:
        raise ValueError(f"{where}: the model's experts stand for {experts}, its merged dataset's modalities are "
                         f"{merged}: the model was trained on another merge. Predict with the model of this merge, "
                         f"or retrain on it.")
    return experts


def predict_merged(input_folder: str, output_folder: str, model_folder: str, modality: str,
                   source: str | None = None, folds=(0,), checkpoint: str = "checkpoint_final.pth",
                   tta: bool = True, step_size: float = 0.5, device: str = "cpu", log=print) -> list:
    """Normalise every ``<case>_0000<ending>`` of ``input_folder`` as ``modality`` (source ``source``) and predict it
    with the model in ``model_folder`` into ``output_folder``; returns the predicted case ids."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder, \
        get_identifiers_from_splitted_dataset_folder

    from nnunet_moe.datasets.normalisation import normalise_for_prediction, write_image_channels
    from nnunet_moe.inference.input_checks import check_prediction_inputs

    paths = {name: os.path.join(model_folder, name) for name in ("dataset.json", "plans.json")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: -m must be a trained model's folder "
                                    f"($nnUNet_results/DatasetXXX/<trainer>__<plans>__<configuration>).")
    with open(paths["dataset.json"]) as f:
        dataset_json = json.load(f)
    with open(paths["plans.json"]) as f:
        plans = json.load(f)
    meta = merge_metadata(dataset_json, paths["dataset.json"])
    experts = _check_experts(plans, meta, paths["plans.json"])
    key = normalisation_source(meta, modality, source)
    params = meta["sources"][key]["normalisation"]
    ending = dataset_json["file_ending"]
    predictor = nnUNetPredictor(tile_step_size=step_size, use_mirroring=tta, device=torch.device(device),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint)
    check_prediction_inputs(input_folder, dataset_json, predictor.configuration_manager.patch_size,
                            os.path.basename(model_folder).split("__")[0])
    cases = [str(c) for c in get_identifiers_from_splitted_dataset_folder(input_folder, ending)]
    keyword = ModalityKeyword(predictor.network)  # the gate's expert for every patch, for this call only
    gate = getattr(keyword.module, "gate", None)
    expert = experts.index(modality) if gate in ("modality", "onehot") and experts else None
    log(f"{len(cases)} case(s) normalised as {modality} of source {key} ({meta['sources'][key]['dataset']}: "
        f"{params['scheme']})" + (f", modality {modality} = expert {expert} for the gate" if expert is not None else ""))
    reader = SimpleITKIO()
    with tempfile.TemporaryDirectory(prefix="nnunet_moe_predict_merged_") as work:
        for case, files in zip(cases, create_lists_from_splitted_dataset_folder(input_folder, ending, cases)):
            image, properties = reader.read_images(files)
            write_image_channels(normalise_for_prediction(image, modality, params), properties,
                                 [os.path.join(work, f"{case}_{c:04d}{ending}") for c in range(len(files))])
        os.makedirs(output_folder, exist_ok=True)
        keyword.set(expert)
        try:
            predictor.predict_from_files(work, output_folder, save_probabilities=False, overwrite=True,
                                         num_processes_preprocessing=1, num_processes_segmentation_export=1)
        finally:
            keyword.remove()
    return cases


def cmd_predict_merged(args) -> int:
    from nnunet_moe.nnunet_paths import require_nnunet_paths

    model = args.model
    if model is None:
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        if args.dataset is None:
            raise ValueError("give the model with -d DATASET (and -tr/-p/-c), or its folder with -m")
        require_nnunet_paths("nnunet-moe predict-merged")
        model = get_output_folder(maybe_convert_to_dataset_name(args.dataset), args.trainer, args.plans,
                                  args.configuration)
    folds = [f if f == "all" else int(f) for f in args.folds]
    predict_merged(args.input, args.output, model, args.modality, args.source, folds, args.checkpoint,
                   not args.disable_tta, args.step_size, args.device)
    return 0


def add_predict_merged_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``predict-merged`` to the ``nnunet-moe`` parser's subparsers."""
    parser = subparsers.add_parser(
        "predict-merged", help="segment new raw images with a model of a merged dataset (normalised by modality)",
        description="Normalise raw images as the merged dataset's source of their modality was normalised "
                    "(merge-datasets writes its cases pre-normalised, channel 'noNorm'), then predict them with "
                    "nnU-Net's predictor. Modality-gated M4oE models also get the modality's expert.",
        epilog="Example: nnunet-moe predict-merged -i new_mr -o pred -d 601 -c 2d -tr nnUNetTrainerM4oE --modality MR")
    parser.add_argument("-i", "--input", required=True, help="raw images named <case>_0000<ending>")
    parser.add_argument("-o", "--output", required=True, help="folder for the segmentations")
    parser.add_argument("--modality", required=True, choices=["CT", "MR"], help="the images' modality")
    parser.add_argument("--source", default=None,
                        help="the merged source (e.g. d502) whose normalisation to use; needed only where several "
                             "sources of the modality were normalised differently")
    parser.add_argument("-d", "--dataset", default=None, help="merged dataset id or name (with -tr, -p, -c)")
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainerM4oE", help="(default: %(default)s)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="(default: %(default)s)")
    parser.add_argument("-c", "--configuration", default="2d", help="(default: %(default)s)")
    parser.add_argument("-m", "--model", default=None, help="the model folder instead of -d/-tr/-p/-c")
    parser.add_argument("-f", "--folds", nargs="+", default=["0"], help="(default: 0)")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="(default: %(default)s)")
    parser.add_argument("-step_size", "--step-size", type=float, default=0.5, help="(default: %(default)s)")
    parser.add_argument("--disable_tta", action="store_true", help="no test-time mirroring")
    parser.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.set_defaults(func=cmd_predict_merged)
    return parser
