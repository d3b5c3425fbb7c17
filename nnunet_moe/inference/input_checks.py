"""Input checks for ``nnUNetv2_predict`` with a model of ours: a clear error before anything is written.

nnU-Net 2.8's ``nnUNetPredictor.predict_from_files`` returns silently (exit code 0, its json files
written) on a folder without images; a case with more channel files than the model was trained on fails
in preprocessing with ``IndexError: list index out of range`` (one normalisation scheme per trained
channel); a 2D image given to a 3D model is resampled into a volume of 999 slices (its dummy axis has
spacing 999) and predicted. For models written by one of our trainers (``-tr`` of nnunet-moe, or a short-schedule
name ``<Trainer>_<E>epochs...``, which subclasses nnU-Net's own trainers too) the predictor checks the
input first (:func:`check_prediction_inputs`): at least one case named ``<case>_<XXXX><ending>`` in
the input folder; each case has exactly the model's channels (``channel_names`` of its dataset.json);
for 3D configurations, no image is 2D (header only, read with SimpleITK where it can).

How the stock command gets the checks: nnU-Net's ``initialize_from_trained_model_folder`` looks up the
checkpoint's trainer, and for ours its search ends in our trainer folder
(``trainers/nnunet_moe_trainers.py``), which calls :func:`adopt_loading_predictor`: that one loading
predictor instance (found on the call stack, as the NMSW trainers find theirs, see
:mod:`nnunet_moe.inference.nmsw_predictor`) becomes a :class:`InputCheckingPredictor`
(``__class__``); no other predictor and no class of nnU-Net changes. Models of nnU-Net's own
trainers never reach our code, and an adopted predictor checks only the model it was adopted for.
"""
from __future__ import annotations

import os

import inspect

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

__all__ = ["InputCheckingPredictor", "adopt_loading_predictor", "check_prediction_inputs"]


def _image_dimension(path: str) -> int | None:
    """Spatial dimension from the file header, None where SimpleITK cannot read it."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetDimension()


def check_prediction_inputs(source, dataset_json: dict, patch_size, trainer: str) -> None:
    """``ValueError`` naming the folder/file and what to do, unless ``source`` (a folder, or nnU-Net's list
    of per-case file lists) holds cases this model can predict."""
    from nnunetv2.utilities.utils import create_paths_fn, get_identifiers_from_splitted_dataset_folder

    ending = dataset_json["file_ending"]
    channels = list(dataset_json.get("channel_names", dataset_json.get("modality", {})).values())
    model = f"{len(patch_size)}D model of {trainer}"
    if isinstance(source, str):
        if not os.path.isdir(source):
            raise ValueError(f"input folder {source} does not exist; pass the folder with the images to predict (-i)")
        identifiers = [str(i) for i in get_identifiers_from_splitted_dataset_folder(source, ending)]
        if not identifiers:
            raise ValueError(
                f"input folder {source} has no images named <case>_0000{ending}, so there is nothing to predict "
                f"(nnU-Net's naming: one file <case>_<XXXX>{ending} per channel; this {model} takes "
                f"{len(channels)} channel(s) {channels}). Check -i and the file names.")
        files = sorted(f for f in os.listdir(source) if f.endswith(ending))
        cases = {i: create_paths_fn(source, files, ending, i) for i in identifiers}
    else:
        cases = {os.path.basename(c[0])[: -len(ending) - 5] if c else "?": list(c) for c in source}
    for case, paths in cases.items():
        if len(paths) != len(channels):
            expected = [f"{case}_{c:04d}{ending}" for c in range(len(channels))]
            raise ValueError(
                f"case {case}: {len(paths)} image file(s) {[os.path.basename(p) for p in paths]}, but this {model} "
                f"was trained on {len(channels)} channel(s) {channels}: give each case exactly the files {expected}.")
    if len(patch_size) == 3:
        for case, paths in cases.items():
            if _image_dimension(paths[0]) == 2:
                raise ValueError(
                    f"{paths[0]} is a 2D image, but this {model} segments 3D volumes: predict 2D images with a 2d "
                    f"model (-c 2d), or give the 3D volume.")


_defaults = {name: p.default for name, p in inspect.signature(nnUNetPredictor.predict_from_files).parameters.items()}


class InputCheckingPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` whose file-based predictions first run :func:`check_prediction_inputs` while it holds
    the model it was adopted for (``checks_inputs_for``: that model's trainer name)."""

    checks_inputs_for = None

    def check_inputs(self, source) -> None:
        if self.checks_inputs_for is not None and getattr(self, "trainer_name", None) == self.checks_inputs_for:
            check_prediction_inputs(source, self.dataset_json, self.configuration_manager.patch_size, self.trainer_name)

    # nnU-Net reads these methods' parameter names back with inspect.signature and looks each up in its own
    # locals(): the overrides must have exactly nnU-Net's parameters (no *args / **kwargs).
    def predict_from_files(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                           save_probabilities=False, overwrite=True,
                           num_processes_preprocessing=_defaults["num_processes_preprocessing"],
                           num_processes_segmentation_export=_defaults["num_processes_segmentation_export"],
                           folder_with_segs_from_prev_stage=None, num_parts=1, part_id=0):
        self.check_inputs(list_of_lists_or_source_folder)
        return super().predict_from_files(list_of_lists_or_source_folder,
                                          output_folder_or_list_of_truncated_output_files, save_probabilities,
                                          overwrite, num_processes_preprocessing, num_processes_segmentation_export,
                                          folder_with_segs_from_prev_stage, num_parts, part_id)

    def predict_from_files_sequential(self, list_of_lists_or_source_folder,
                                      output_folder_or_list_of_truncated_output_files, save_probabilities=False,
                                      overwrite=True, folder_with_segs_from_prev_stage=None):
        self.check_inputs(list_of_lists_or_source_folder)
        return super().predict_from_files_sequential(list_of_lists_or_source_folder,
                                                     output_folder_or_list_of_truncated_output_files,
                                                     save_probabilities, overwrite, folder_with_segs_from_prev_stage)


_CHECKING_CLASSES: dict = {}  # predictor class -> its InputCheckingPredictor subclass


def _checking_class_for(cls: type) -> type:
    if issubclass(cls, InputCheckingPredictor):
        return cls
    if cls is nnUNetPredictor:
        return InputCheckingPredictor
    if cls not in _CHECKING_CLASSES:  # e.g. an NMSWPredictor keeps its methods below the checks
        _CHECKING_CLASSES[cls] = type(f"InputChecking{cls.__name__}", (InputCheckingPredictor, cls), {})
    return _CHECKING_CLASSES[cls]


def adopt_loading_predictor() -> None:
    """If nnU-Net's ``initialize_from_trained_model_folder`` is loading a checkpoint further up the call stack,
    make that predictor an :class:`InputCheckingPredictor`; any other caller changes nothing."""
    from nnunet_moe.inference.loading import loading_locals

    names = loading_locals()
    if names is not None:
        predictor = names["self"]
        predictor.__class__ = _checking_class_for(type(predictor))
        predictor.checks_inputs_for = names.get("trainer_name")  # a later model of nnU-Net's own is not checked
