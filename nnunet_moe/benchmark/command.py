"""``nnunet-moe benchmark``: trained nnU-Net models side by side on the same cases.

For every trainer given with ``-tr`` the command loads the stock results folder
``$nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>/fold_<f>/<checkpoint>``
with nnU-Net's own ``nnUNetPredictor`` (``initialize_from_trained_model_folder``), predicts
every case, scores it and measures its cost, then writes one report for all models
(``report.md``, ``results.csv``, ``results.json``, ``dice_vs_time.png`` via
``nnunet_moe.benchmark.report.write_reports``) plus ``per_case.json`` and the predicted
segmentations.

Cases: by default the validation cases of the fold (``splits_final.json`` in
``$nnUNet_preprocessed/DatasetXXX_Name``; images from ``$nnUNet_raw/.../imagesTr``, labels from
``labelsTr``), or every case of an image folder ``-i`` (nnU-Net naming ``<case>_<XXXX><ending>``)
with its label ``<case><ending>`` in ``-l``. ``--demo`` uses the held-out cases
(``imagesTs``/``labelsTs``) of the demo dataset written by ``nnunet-moe demo`` -- the cases whose
Dice that command prints -- and every trainer that has a checkpoint there.

What is measured, per case (one image of ``C`` channels, ``(D, H, W)`` or ``(H, W)`` voxels):

* seconds per case: wall clock of nnU-Net's inference pipeline for one case, run sequentially in
  this process -- reading the image files with the plans' reader, nnU-Net's preprocessing
  (cropping, normalisation, resampling: ``preprocessor.run_case_npy``), the network inference
  (``predictor.predict_logits_from_preprocessed_data``: sliding window with Gaussian weighting
  and mirroring test-time augmentation unless ``--no-tta``, or the mode's replacement), and the
  export (``export_prediction_from_logits``: resampling back, argmax, writing the segmentation
  file). This is what ``nnUNetv2_predict`` does for one case, without its worker processes
  overlapping the steps of consecutive cases. The first case of each model and mode is run once
  untimed beforehand (warm-up: lazy initialisation, cuDNN autotuning). ``per_case.json`` splits
  the time into read / preprocess / network / export.
* peak memory per case: ``cost.measure``. On CUDA the absolute ``torch.cuda.max_memory_allocated``
  during the case (weights included: the figure usually quoted as "peak GPU memory"); on CPU the
  peak of torch's tensor allocations above the level at the start of the case, from one extra,
  untimed run of the case under the profiler (numpy buffers of reading/export are not counted).
* FLOPs per case: ``cost.count_flops`` (2 FLOPs per multiply-accumulate) around the whole network
  inference of the case, ``predict_logits_from_preprocessed_data`` on its preprocessed tensor:
  every sliding-window patch and every mirrored TTA pass, or whatever the mode runs instead.
  This is exact per case rather than "FLOPs of one patch times the number of patches", which
  would be wrong for modes whose work depends on the image (NMSW picks up to K patches where
  its global network sees foreground). Sliding-window cost only depends on the preprocessed
  shape, so it is counted once per shape and model; other modes are counted on every case.
  Preprocessing and export add no FLOPs (they are not convolutions or matmuls).
* parameters: ``cost.count_parameters`` of the network that the mode runs.
* Dice, HD95 (mm), NSD (tolerance ``--nsd-tolerance`` mm) per foreground label or region:
  ``metrics.case_metrics_from_files`` on the written prediction and the reference label file
  (spacing from the reference file), means over cases with ``metrics.aggregate``.

A model's row reports the mean seconds and FLOPs per case and the largest peak memory.

Inference modes (``--modes``, default ``auto``) run the same weights in different ways, side by
side: ``sliding_window`` (nnU-Net's default) and ``nmsw`` (NMSW-Net's top-K patch inference,
Jeon et al., via ``nnunet_moe.inference.nmsw_predictor.install()``, which makes
``nnUNetPredictor.predict_sliding_window_return_logits`` dispatch to NMSW for NMSW networks;
``--nmsw-k`` sets ``NNUNET_MOE_NMSW_K`` for it). ``auto`` picks ``nmsw`` for an NMSW network and
``sliding_window`` otherwise. ``sliding_window`` on an NMSW model runs nnU-Net's sliding window
with the model's local (full-resolution patch) network alone, the baseline the NMSW paper
compares against on the same weights; its parameter count is then the local network's. A new
mode is a subclass of ``InferenceMode`` added to ``MODES``.

Bad input never stops the other models: a trainer without results folder, a fold without
checkpoint, a model whose ``dataset.json`` labels or channels differ from the reference
dataset's, or a mode that does not apply to a model is reported with what is missing (path,
trainer, labels) and skipped. Only when no model could be evaluated does the command fail.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

DEFAULT_PLANS = "nnUNetPlans"
DEFAULT_CHECKPOINT = "checkpoint_final.pth"
DEFAULT_DEMO_DATASET_ID = 501
AUTO_MODE = "auto"
MIB = 1024 ** 2


# ----------------------------------------------------------------------------------------- modes
from nnunet_moe.networks.unwrap import unwrap_network  # noqa: E402


def is_nmsw_network(network) -> bool:
    try:
        from nnunet_moe.networks.nmsw import NMSWNet
    except ImportError:  # a build without the NMSW network cannot have NMSW checkpoints
        return False
    return isinstance(unwrap_network(network), NMSWNet)


class InferenceMode:
    """One way of running a loaded ``nnUNetPredictor`` on preprocessed data.

    ``unavailable_reason`` says why the mode cannot run this predictor's network (None: it can);
    ``active`` is a context manager that prepares the predictor and yields the network whose
    parameters the mode uses, and restores the predictor on exit.
    """

    name = ""
    description = ""
    cache_flops_by_shape = False  # True when the mode's FLOPs depend only on the preprocessed shape

    def unavailable_reason(self, predictor) -> str | None:
        return None

    @contextlib.contextmanager
    def active(self, predictor, options: "BenchmarkOptions"):
        yield predictor.network


class SlidingWindowMode(InferenceMode):
    name = "sliding_window"
    description = "nnU-Net's sliding window (Gaussian weighting, mirroring TTA unless --no-tta)"
    cache_flops_by_shape = True

    @contextlib.contextmanager
    def active(self, predictor, options):
        if not is_nmsw_network(predictor.network):
            yield predictor.network
            return
        # Same NMSW weights, stock sliding window over the local network only. The predictor
        # reloads list_of_parameters into predictor.network before every prediction, so both are
        # swapped; a network that is not an NMSWNet is never dispatched to NMSW inference.
        local_net = unwrap_network(predictor.network).local_net
        saved = predictor.network, predictor.list_of_parameters
        predictor.network, predictor.list_of_parameters = local_net, [local_net.state_dict()]
        try:
            yield local_net
        finally:
            predictor.network, predictor.list_of_parameters = saved


class NMSWMode(InferenceMode):
    name = "nmsw"
    description = "NMSW-Net top-K patch inference (no sliding window)"

    def unavailable_reason(self, predictor):
        if not is_nmsw_network(predictor.network):
            return (f"mode 'nmsw' needs an NMSW-Net model (nnunet_moe.networks.nmsw.NMSWNet) but this network is "
                    f"{type(unwrap_network(predictor.network)).__name__}")
        try:
            import nnunet_moe.inference.nmsw_predictor  # noqa: F401
        except ImportError as error:
            return f"mode 'nmsw' needs nnunet_moe.inference.nmsw_predictor, which cannot be imported ({error})"
        return None

    @contextlib.contextmanager
    def active(self, predictor, options):
        from nnunet_moe.inference import nmsw_predictor

        nmsw_predictor.install()  # patches nnUNetPredictor once per process; later calls change nothing
        k_env = nmsw_predictor.K_ENV
        previous_k = os.environ.get(k_env)
        if options.nmsw_k is not None:
            os.environ[k_env] = str(options.nmsw_k)
        try:
            yield predictor.network
        finally:
            if options.nmsw_k is not None:
                if previous_k is None:
                    os.environ.pop(k_env, None)
                else:
                    os.environ[k_env] = previous_k


MODES = {mode.name: mode for mode in (SlidingWindowMode(), NMSWMode())}


def resolve_modes(network, requested: list) -> list:
    """Mode names to run for ``network``: ``auto`` becomes ``nmsw`` for NMSW networks, else ``sliding_window``."""
    resolved = []
    for name in requested:
        if name == AUTO_MODE:
            name = NMSWMode.name if is_nmsw_network(network) else SlidingWindowMode.name
        elif name not in MODES:
            raise ValueError(f"unknown inference mode {name!r}; choose from {[AUTO_MODE, *MODES]}")
        if name not in resolved:
            resolved.append(name)
    return resolved


# ------------------------------------------------------------------------------- inputs, folders
@dataclass
class Case:
    identifier: str
    image_files: list
    label_file: str | None  # None: no reference to score against (nmsw_bench without --labels)


@dataclass
class BenchmarkOptions:
    device: str = "cpu"
    checkpoint: str = DEFAULT_CHECKPOINT
    tta: bool = True
    step_size: float = 0.5
    nmsw_k: int | None = None
    nsd_tolerance_mm: float = 1.0


@dataclass
class BenchmarkResult:
    rows: list
    out_dir: str | None
    paths: dict
    problems: list
    per_case: list = field(default_factory=list)


def resolve_dataset_name(dataset: str, folders: dict) -> str:
    """``DatasetXXX_Name`` for an id ("501", "5") or a full name, looked up in nnU-Net's three folders.

    nnunetv2.paths reads the environment once, when it is first imported; the folders are passed in
    here (read from the environment at call time) so that a later change of the variables counts.
    """
    dataset = str(dataset).strip()
    if dataset.startswith("Dataset"):
        return dataset
    try:
        dataset_id = int(dataset)
    except ValueError:
        raise ValueError(f"-d {dataset!r} is neither a dataset id (e.g. 501) nor a name (e.g. Dataset501_Hippocampus)")
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id {dataset_id} is outside nnU-Net's range 1..999")
    prefix = f"Dataset{dataset_id:03d}_"
    names = set()
    for base in folders.values():
        if os.path.isdir(base):
            names.update(d for d in os.listdir(base) if d.startswith(prefix) and os.path.isdir(os.path.join(base, d)))
    if not names:
        searched = ", ".join(f"{var}={path}" for var, path in folders.items())
        raise ValueError(f"unknown dataset id {dataset_id}: no folder {prefix}* in {searched}")
    if len(names) > 1:
        raise ValueError(f"dataset id {dataset_id} is ambiguous: {sorted(names)} share it; pass the full name with -d")
    return names.pop()


def model_folder(results: str, dataset_name: str, trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's results folder of one trainer (``get_output_folder``'s layout)."""
    return os.path.join(results, dataset_name, f"{trainer}__{plans}__{configuration}")


def trained_trainers(results: str, dataset_name: str, plans: str, configuration: str, fold: str,
                     checkpoint: str = DEFAULT_CHECKPOINT) -> list:
    """Trainer names with ``fold_<fold>/<checkpoint>`` for this plans and configuration, sorted."""
    base = os.path.join(results, dataset_name)
    if not os.path.isdir(base):
        return []
    suffix = f"__{plans}__{configuration}"
    return sorted(
        d[: -len(suffix)] for d in os.listdir(base)
        if d.endswith(suffix) and os.path.isfile(os.path.join(base, d, f"fold_{fold}", checkpoint))
    )


def checkpoint_problem(folder: str, trainer: str, fold: str, checkpoint: str, dataset_name: str,
                       configuration: str, plans: str) -> str | None:
    """Why ``folder/fold_<fold>/<checkpoint>`` cannot be loaded (None when it can)."""
    if not os.path.isdir(folder):
        parent, suffix = os.path.dirname(folder), f"__{plans}__{configuration}"
        present = sorted(d[: -len(suffix)] for d in os.listdir(parent) if d.endswith(suffix)) \
            if os.path.isdir(parent) else []
        hint = f" Trainers with {plans} {configuration} results: {', '.join(present)}." if present else ""
        return (f"trainer {trainer}: no results folder {folder} (train it with `nnUNetv2_train {dataset_name} "
                f"{configuration} {fold} -tr {trainer} -p {plans}`, or check -tr/-p/-c).{hint}")
    fold_dir = os.path.join(folder, f"fold_{fold}")
    if not os.path.isdir(fold_dir):
        folds = sorted(d for d in os.listdir(folder) if d.startswith("fold_"))
        return f"trainer {trainer}: no folder fold_{fold} in {folder} (folds present: {', '.join(folds) or 'none'})."
    path = os.path.join(fold_dir, checkpoint)
    if not os.path.isfile(path):
        others = sorted(f for f in os.listdir(fold_dir) if f.endswith(".pth"))
        hint = (f" Found {', '.join(others)}: the training may be unfinished; pass --checkpoint {others[0]} to use "
                f"another checkpoint." if others else " No checkpoint at all: has training started?")
        return f"trainer {trainer}: no checkpoint {path}.{hint}"
    for name in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            return f"trainer {trainer}: {os.path.join(folder, name)} is missing (nnU-Net writes it when training starts)."
    return None


def _load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _normalised_labels(dataset_json: dict) -> dict:
    """dataset.json ``labels`` with region lists as tuples, comparable with ``==``."""
    return {name: tuple(v) if isinstance(v, (list, tuple)) else int(v) for name, v in dataset_json["labels"].items()}


def _num_channels(dataset_json: dict) -> int:
    return len(dataset_json.get("channel_names", dataset_json.get("modality", {})))


def compatibility_problem(trainer: str, model_json: dict, model_json_path: str, reference: dict,
                          reference_path: str) -> str | None:
    """Why a model cannot be scored against the reference dataset (labels or channels differ)."""
    model_labels, reference_labels = _normalised_labels(model_json), _normalised_labels(reference)
    if model_labels != reference_labels or model_json.get("regions_class_order") != reference.get("regions_class_order"):
        return (f"trainer {trainer}: its labels {model_labels} ({model_json_path}) differ from the reference labels "
                f"{reference_labels} ({reference_path}); a Dice per label would compare different structures, "
                f"so this model is skipped.")
    if _num_channels(model_json) != _num_channels(reference):
        return (f"trainer {trainer}: it expects {_num_channels(model_json)} input channels "
                f"{model_json.get('channel_names')} ({model_json_path}) but the reference dataset has "
                f"{_num_channels(reference)} {reference.get('channel_names')} ({reference_path}); skipped.")
    return None


def scored_labels(dataset_json: dict) -> tuple:
    """(labels or regions to score, {label: class name}) from a dataset.json, background left out."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    manager = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    if manager.has_regions:
        labels = [tuple(r) if isinstance(r, (list, tuple)) else int(r) for r in manager.foreground_regions]
    else:
        labels = [int(label) for label in manager.foreground_labels]
    names = {}
    for name, value in dataset_json["labels"].items():
        key = tuple(value) if isinstance(value, (list, tuple)) else int(value)
        names.setdefault(key, name)
    return labels, {label: names.get(label, str(label)) for label in labels}


def _case_files(image_folder: str, identifiers: list, file_ending: str, num_channels: int) -> dict:
    from nnunetv2.utilities.utils import create_paths_fn

    files = sorted(f for f in os.listdir(image_folder) if f.endswith(file_ending))
    grouped = {}
    for identifier in identifiers:
        paths = create_paths_fn(image_folder, files, file_ending, identifier)
        if len(paths) != num_channels:
            expected = [f"{identifier}_{c:04d}{file_ending}" for c in range(num_channels)]
            raise ValueError(f"case {identifier}: expected {num_channels} image file(s) {expected} in {image_folder}, "
                             f"found {[os.path.basename(p) for p in paths]}")
        grouped[identifier] = paths
    return grouped


def cases_from_folders(image_folder: str, label_folder: str, file_ending: str, num_channels: int) -> list:
    """Every case of an nnU-Net-style image folder with its label file."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    for flag, folder in (("-i", image_folder), ("-l", label_folder)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} {folder} is not a folder")
    identifiers = [str(i) for i in get_identifiers_from_splitted_dataset_folder(image_folder, file_ending)]
    if not identifiers:
        raise ValueError(f"no images named <case>_<XXXX>{file_ending} in {image_folder} (nnU-Net's naming, "
                         f"file ending from dataset.json)")
    return _cases(image_folder, label_folder, identifiers, file_ending, num_channels)


def _cases(image_folder, label_folder, identifiers, file_ending, num_channels) -> list:
    images = _case_files(image_folder, identifiers, file_ending, num_channels)
    missing = [i for i in identifiers if not os.path.isfile(os.path.join(label_folder, i + file_ending))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} case(s) have no label file in {label_folder}: "
                                f"{', '.join(m + file_ending for m in missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return [Case(i, images[i], os.path.join(label_folder, i + file_ending)) for i in identifiers]


def validation_cases(raw_dataset: str, preprocessed_dataset: str, fold: str, file_ending: str,
                     num_channels: int) -> list:
    """The fold's validation cases from nnU-Net's ``splits_final.json``, images/labels from the raw dataset."""
    if fold == "all":
        raise ValueError("fold 'all' trains on every case, so it has no validation cases; pass -i IMAGES -l LABELS")
    splits_file = os.path.join(preprocessed_dataset, "splits_final.json")
    if not os.path.isfile(splits_file):
        raise FileNotFoundError(f"{splits_file} does not exist (nnU-Net writes it when the first fold is trained); "
                                f"train a fold first or pass -i IMAGES -l LABELS")
    splits = _load_json(splits_file)
    if not 0 <= int(fold) < len(splits):
        raise ValueError(f"fold {fold} is not in {splits_file}, which has folds 0..{len(splits) - 1}")
    identifiers = list(splits[int(fold)]["val"])
    return _cases(os.path.join(raw_dataset, "imagesTr"), os.path.join(raw_dataset, "labelsTr"), identifiers,
                  file_ending, num_channels)


def free_folder(path: str) -> str:
    from nnunet_moe.demo import free_folder as _free_folder

    return _free_folder(path)


# ------------------------------------------------------------------------------------ inference
def load_predictor(folder: str, fold: str, options: BenchmarkOptions):
    """nnU-Net's predictor for one trained fold, as ``nnUNetv2_predict`` builds it."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = torch.device(options.device)
    # nnU-Net prints a CPU notice on construction and its trainer-class search line by line; one
    # model's load would push the progress bar off the screen
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(tile_step_size=options.step_size, use_gaussian=True, use_mirroring=options.tta,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(folder, (fold if fold == "all" else int(fold),),
                                                       checkpoint_name=options.checkpoint)
    if predictor.configuration_manager.previous_stage_name is not None:
        raise ValueError(f"configuration {predictor.configuration_manager.configuration} is a cascade stage; "
                         f"benchmarking cascades (which need the previous stage's predictions) is not supported")
    return predictor


class CaseRunner:
    """Runs one case through read -> preprocess -> network -> export; records stage seconds."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.reader = predictor.plans_manager.image_reader_writer_class()
        self.preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
        self.stage_seconds = []
        self.last_data = None

    def __call__(self, case: Case, output_truncated: str) -> None:
        import torch
        from nnunetv2.inference.export_prediction import export_prediction_from_logits

        p = self.predictor
        t0 = time.perf_counter()
        image, properties = self.reader.read_images(case.image_files)
        t1 = time.perf_counter()
        data, _, properties = self.preprocessor.run_case_npy(image, None, properties, p.plans_manager,
                                                             p.configuration_manager, p.dataset_json)
        data = torch.from_numpy(data)
        t2 = time.perf_counter()
        logits = p.predict_logits_from_preprocessed_data(data).cpu()  # .cpu() waits for the device
        t3 = time.perf_counter()
        export_prediction_from_logits(logits, properties, p.configuration_manager, p.plans_manager, p.dataset_json,
                                      output_truncated, False)
        t4 = time.perf_counter()
        self.stage_seconds.append({"read": t1 - t0, "preprocess": t2 - t1, "network": t3 - t2, "export": t4 - t3})
        self.last_data = data


# ------------------------------------------------------------------------------------ the command
@contextlib.contextmanager
def _native_stderr_silenced(enabled: bool):
    """Send file descriptor 2 to /dev/null, e.g. around torch's CPU profiler.

    The profiler's C++ side (kineto) writes two "USDT ... profiler_start/stop" lines to stderr on
    every use, whatever its log level; one run per case would bury the progress bar.
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def _mean(values: list):
    return sum(values) / len(values) if values else None


def benchmark(dataset, configuration: str, trainers: list, fold, plans: str = DEFAULT_PLANS,
              images: str | None = None, labels: str | None = None, out: str | None = None,
              device: str = "cpu", modes: list | None = None, checkpoint: str = DEFAULT_CHECKPOINT,
              tta: bool = True, step_size: float = 0.5, nmsw_k: int | None = None, nsd_tolerance_mm: float = 1.0,
              demo: bool = False, progress: bool = True, log=print) -> BenchmarkResult:
    """Run the benchmark; see the module docstring. Returns rows, output folder, file paths and problems.

    Raises ValueError / FileNotFoundError / RuntimeError for input that stops the whole run (missing
    nnU-Net variables, unknown dataset, no cases), and RuntimeError when no model could be evaluated.
    """
    import torch

    from nnunet_moe.nnunet_paths import require_nnunet_paths

    folders = require_nnunet_paths("nnunet-moe benchmark")
    fold = str(fold)
    if fold != "all" and not fold.isdigit():
        raise ValueError(f"-f {fold!r}: a fold is a non-negative integer or 'all'")
    if (images is None) != (labels is None):
        raise ValueError("give both -i IMAGES and -l LABELS, or neither (then the fold's validation cases are used)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    if not 0 < step_size <= 1:
        raise ValueError(f"--step-size {step_size}: nnU-Net's tile step size must be in (0, 1]")
    if nmsw_k is not None and nmsw_k < 1:
        raise ValueError(f"--nmsw-k {nmsw_k}: K must be a positive integer")
    modes = list(modes or [AUTO_MODE])
    for name in modes:
        if name != AUTO_MODE and name not in MODES:
            raise ValueError(f"unknown inference mode {name!r}; choose from {[AUTO_MODE, *MODES]}")
    options = BenchmarkOptions(device=device, checkpoint=checkpoint, tta=tta, step_size=step_size, nmsw_k=nmsw_k,
                               nsd_tolerance_mm=nsd_tolerance_mm)

    dataset_name = resolve_dataset_name(dataset, folders)
    raw_dataset = os.path.join(folders["nnUNet_raw"], dataset_name)
    preprocessed_dataset = os.path.join(folders["nnUNet_preprocessed"], dataset_name)
    if demo and not trainers:
        trainers = trained_trainers(folders["nnUNet_results"], dataset_name, plans, configuration, fold, checkpoint)
        if not trainers:
            raise RuntimeError(
                f"no trained model for the demo dataset: nothing in {os.path.join(folders['nnUNet_results'], dataset_name)}"
                f" has {plans}__{configuration}/fold_{fold}/{checkpoint}. Run `nnunet-moe demo` first.")
        log(f"Demo: trainers with a {configuration} fold {fold} checkpoint: {', '.join(trainers)}")
    if not trainers:
        raise ValueError("no trainer given: pass -tr TRAINER [TRAINER ...]")

    problems = []

    def report_problem(message: str) -> None:
        problems.append(message)
        say(f"SKIPPED: {message}")

    # models that exist, with their dataset.json (labels are checked against the reference below)
    candidates = []
    bar = None
    say = log
    for trainer in trainers:
        folder = model_folder(folders["nnUNet_results"], dataset_name, trainer, plans, configuration)
        problem = checkpoint_problem(folder, trainer, fold, checkpoint, dataset_name, configuration, plans)
        if problem:
            report_problem(problem)
        else:
            candidates.append((trainer, folder))

    if not candidates:
        raise RuntimeError("no model could be evaluated:\n  " + "\n  ".join(problems))
    reference_path = next((p for p in (os.path.join(raw_dataset, "dataset.json"),
                                       os.path.join(preprocessed_dataset, "dataset.json")) if os.path.isfile(p)), None)
    if reference_path is None:  # only a results folder: the first model's dataset is the reference
        reference_path = os.path.join(candidates[0][1], "dataset.json")
    reference = _load_json(reference_path)
    file_ending = reference["file_ending"]
    label_list, class_names = scored_labels(reference)

    if images is not None:
        cases = cases_from_folders(images, labels, file_ending, _num_channels(reference))
        case_source = f"{images}"
    elif demo and os.path.isdir(os.path.join(raw_dataset, "imagesTs")):
        cases = cases_from_folders(os.path.join(raw_dataset, "imagesTs"), os.path.join(raw_dataset, "labelsTs"),
                                   file_ending, _num_channels(reference))
        case_source = "demo held-out cases (imagesTs)"
    else:
        cases = validation_cases(raw_dataset, preprocessed_dataset, fold, file_ending, _num_channels(reference))
        case_source = f"fold {fold} validation cases"
    if not cases:
        raise ValueError(f"no cases to evaluate ({case_source})")

    out_dir = free_folder(out or os.path.join(folders["nnUNet_results"], dataset_name,
                                              f"benchmark_{configuration}_fold{fold}"))
    title = (f"{dataset_name} {configuration} fold {fold}: {len(cases)} cases ({case_source}), {device}, "
             f"TTA {'on' if tta else 'off'}")
    log(f"Benchmark: {title}")
    log(f"Results will go to {out_dir}")

    per_mode_count = len(modes)
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(trainers) * per_mode_count * len(cases), desc="benchmark", unit="case",
                   file=sys.stderr, dynamic_ncols=True)
        say = tqdm.write
        # models already skipped above count as done
        bar.update((len(trainers) - len(candidates)) * per_mode_count * len(cases))

    rows, per_case_records = [], []
    try:
        for trainer, folder in candidates:
            model_json_path = os.path.join(folder, "dataset.json")
            problem = compatibility_problem(trainer, _load_json(model_json_path), model_json_path, reference,
                                            reference_path)
            if problem:
                report_problem(problem)
                bar and bar.update(per_mode_count * len(cases))
                continue
            try:
                predictor = load_predictor(folder, fold, options)
            except Exception as error:  # one broken model must not stop the others
                report_problem(f"trainer {trainer}: loading {folder} fold {fold} failed: {type(error).__name__}: {error}")
                bar and bar.update(per_mode_count * len(cases))
                continue
            resolved = resolve_modes(predictor.network, modes)
            bar and bar.update((per_mode_count - len(resolved)) * len(cases))  # 'auto' duplicates collapse
            for mode_name in resolved:
                mode = MODES[mode_name]
                reason = mode.unavailable_reason(predictor)
                if reason:
                    report_problem(f"trainer {trainer}, mode {mode_name}: {reason}")
                    bar and bar.update(len(cases))
                    continue
                try:
                    model_rows, records = _benchmark_model(trainer, mode, predictor, cases, options, label_list,
                                                           class_names, out_dir, file_ending, bar, say)
                except Exception as error:
                    report_problem(f"trainer {trainer}, mode {mode_name}: {type(error).__name__}: {error}")
                    continue
                rows += model_rows
                per_case_records += records
            del predictor
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        if bar is not None:
            bar.close()

    if not rows:
        raise RuntimeError("no model could be evaluated:\n  " + "\n  ".join(problems))

    from nnunet_moe.benchmark.report import markdown_tables, write_reports

    paths = write_reports(rows, out_dir, title)
    paths["per_case"] = os.path.join(out_dir, "per_case.json")
    settings = {"dataset": dataset_name, "configuration": configuration, "plans": plans, "fold": fold,
                "checkpoint": checkpoint, "device": device, "tta": tta, "step_size": step_size, "nmsw_k": nmsw_k,
                "nsd_tolerance_mm": nsd_tolerance_mm, "cases": [c.identifier for c in cases],
                "case_source": case_source, "reference_dataset_json": reference_path,
                "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    with open(paths["per_case"], "w") as f:
        json.dump({"settings": settings, "problems": problems, "cases": per_case_records}, f, indent=2, default=str)
    log("")
    log(markdown_tables(rows))
    if problems:
        log(f"{len(problems)} model(s)/mode(s) skipped:")
        for message in problems:
            log(f"  - {message}")
    log(f"Report: {paths['markdown']}\nCSV: {paths['csv']}\nJSON: {paths['json']}\nPlot: {paths['png']}\n"
        f"Per case: {paths['per_case']}")
    return BenchmarkResult(rows, out_dir, paths, problems, per_case_records)


def _benchmark_model(trainer, mode, predictor, cases, options, label_list, class_names, out_dir, file_ending,
                     bar, say):
    from nnunet_moe.benchmark.cost import count_flops, count_parameters, measure
    from nnunet_moe.benchmark.metrics import aggregate, case_metrics_from_files
    from nnunet_moe.benchmark.report import rows_from_aggregate

    prediction_dir = os.path.join(out_dir, "predictions", _safe_name(f"{trainer}__{mode.name}"))
    os.makedirs(prediction_dir, exist_ok=True)
    runner = CaseRunner(predictor)
    metrics_per_case, records, flops_by_shape = [], [], {}
    with mode.active(predictor, options) as network:
        params = count_parameters(network)
        for index, case in enumerate(cases):
            output_truncated = os.path.join(prediction_dir, case.identifier)
            warmup = 1 if index == 0 else 0
            runner.stage_seconds.clear()
            with _native_stderr_silenced(options.device == "cpu"):  # CPU memory comes from the profiler
                cost = measure(runner, case, output_truncated, device=options.device, repeats=1, warmup=warmup)
            stages = runner.stage_seconds[warmup]  # the timed call (warm-up first, profiler run after)
            data = runner.last_data
            shape = tuple(data.shape)
            if mode.cache_flops_by_shape and shape in flops_by_shape:
                flops = flops_by_shape[shape]
            else:
                flops = count_flops(predictor.predict_logits_from_preprocessed_data, data)
                flops_by_shape[shape] = flops
            runner.last_data = data = None
            scores = case_metrics_from_files(case.label_file, output_truncated + file_ending, label_list,
                                             reader=runner.reader, nsd_tolerance_mm=options.nsd_tolerance_mm)
            metrics_per_case.append(scores)
            peak = cost["device_peak_memory_bytes"] if cost["device_peak_memory_bytes"] is not None \
                else cost["peak_memory_bytes"]
            records.append({"model": trainer, "mode": mode.name, "case": case.identifier,
                            "seconds": cost["seconds"], "stage_seconds": stages,
                            "peak_memory_bytes": peak, "peak_memory_above_start_bytes": cost["peak_memory_bytes"],
                            "flops": flops, "preprocessed_shape": list(shape),
                            "metrics": {str(label): values for label, values in scores.items()}})
            if bar is not None:
                bar.set_postfix_str(f"{trainer} {mode.name}", refresh=False)
                bar.update(1)
    seconds = _mean([r["seconds"] for r in records])
    mean_flops = _mean([r["flops"] for r in records])
    peak_mb = max(r["peak_memory_bytes"] for r in records) / MIB
    aggregated = aggregate(metrics_per_case)
    say(f"{trainer} ({mode.name}): mean Dice {aggregated['foreground_mean']['dice']:.4f}, "
        f"{seconds:.3f} s/case, {params} parameters")
    rows = rows_from_aggregate(trainer, mode.name, aggregated, class_names, params=params,
                               flops=int(round(mean_flops)) if mean_flops is not None and math.isfinite(mean_flops)
                               else None, seconds_per_case=seconds, peak_memory_mb=peak_mb)
    return rows, records


# ----------------------------------------------------------------------------------------- CLI
def add_benchmark_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``benchmark`` subcommand to the ``nnunet-moe`` parser's subparsers."""
    parser = subparsers.add_parser(
        "benchmark", help="trained models side by side: Dice/HD95/NSD, parameters, FLOPs, time and memory per case",
        description="Predict the same cases with several trained nnU-Net models (stock results folders) and "
                    "write a Markdown/CSV/JSON/PNG report. Without -i/-l the fold's validation cases are used.")
    parser.add_argument("-d", "--dataset", "--dataset-id", dest="dataset", default=None,
                        help="dataset id or DatasetXXX_Name (required unless --demo; --demo default: 501)")
    parser.add_argument("-c", "--configuration", default=None, help="e.g. 3d_fullres (--demo default: 3d_fullres)")
    parser.add_argument("-tr", "--trainers", nargs="+", default=None, metavar="TRAINER",
                        help="trainer names, as given to nnUNetv2_train -tr (--demo: every trained one)")
    parser.add_argument("-f", "--fold", default=None, help="fold (0-4 or all; --demo default: 0)")
    parser.add_argument("-p", "--plans", default=DEFAULT_PLANS, help="plans identifier (default: %(default)s)")
    parser.add_argument("-i", "--images", default=None, help="image folder (<case>_<XXXX><ending>); needs -l")
    parser.add_argument("-l", "--labels", default=None, help="label folder (<case><ending>); needs -i")
    parser.add_argument("-o", "--out", default=None,
                        help="output folder (default: $nnUNet_results/DatasetXXX_Name/benchmark_<config>_fold<f>); "
                             "an existing folder is never overwritten: _2, _3... is appended")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: %(default)s)")
    parser.add_argument("--modes", nargs="+", default=[AUTO_MODE], choices=[AUTO_MODE, *MODES],
                        help="inference modes run side by side on every model (default: auto = nmsw for NMSW "
                             "models, sliding_window otherwise)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint file (default: %(default)s)")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="no mirroring test-time augmentation")
    parser.add_argument("--step-size", type=float, default=0.5, help="sliding-window tile step (default: %(default)s)")
    parser.add_argument("--nmsw-k", type=int, default=None, help="local patches per volume for mode nmsw (default: the predictor's K, 5 as in the paper)")
    parser.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD tolerance in mm (default: %(default)s)")
    parser.add_argument("--demo", action="store_true",
                        help="the demo dataset of `nnunet-moe demo` (held-out cases, every trained trainer)")
    parser.add_argument("--work-dir", default="nnunet_moe_demo",
                        help="with --demo: where `nnunet-moe demo` put nnU-Net's folders when they were unset "
                             "(default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(func=run_benchmark)
    return parser


def _demo_paths(work_dir: str) -> None:
    """Point unset nnU-Net variables at ``nnunet-moe demo``'s work folder, if it exists."""
    from nnunet_moe.nnunet_paths import NNUNET_FOLDER_VARS

    for var in NNUNET_FOLDER_VARS:
        if os.environ.get(var):
            continue
        path = os.path.abspath(os.path.join(work_dir, var))
        if not os.path.isdir(path):
            raise RuntimeError(f"{var} is not set and the demo folder {path} does not exist: no trained demo model. "
                               f"Run `nnunet-moe demo` first (or set nnU-Net's variables / --work-dir).")
        os.environ[var] = path


def run_benchmark(args) -> int:
    """``nnunet-moe benchmark``: 0 when at least one model was evaluated (errors raise, see ``benchmark``)."""
    dataset, configuration, fold = args.dataset, args.configuration, args.fold
    if args.demo:
        _demo_paths(args.work_dir)
        from nnunet_moe.demo import DEFAULT_CONFIGURATION

        dataset = dataset if dataset is not None else str(DEFAULT_DEMO_DATASET_ID)
        configuration = configuration or DEFAULT_CONFIGURATION
        fold = fold if fold is not None else "0"
    else:
        missing = [flag for flag, value in (("-d", dataset), ("-c", configuration), ("-tr", args.trainers),
                                            ("-f", fold)) if value is None]
        if missing:
            raise ValueError(f"the following arguments are required without --demo: {', '.join(missing)}")
    benchmark(dataset, configuration, list(args.trainers or []), fold, plans=args.plans, images=args.images,
              labels=args.labels, out=args.out, device=args.device, modes=args.modes, checkpoint=args.checkpoint,
              tta=args.tta, step_size=args.step_size, nmsw_k=args.nmsw_k, nsd_tolerance_mm=args.nsd_tolerance,
              demo=args.demo, progress=args.progress)
    return 0

