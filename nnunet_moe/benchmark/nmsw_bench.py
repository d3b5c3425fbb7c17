"""NMSW-Net versus nnU-Net's sliding window on the same volumes and the same local-network weights.

Paper: Jeon, Yang, Fu, Feng, "No More Sliding Window" (NMSW-Net), Table I: seconds per case, FLOPs
and Dice of NMSW (global pass + K local patches) against sliding-window inference with the same
local network.

Run ``python -m nnunet_moe.benchmark.nmsw_bench`` (see ``--help``). Two ways to get a model:

- ``--model-folder F [--fold 0] --images I [--labels L]``: a trained ``nnUNetTrainerNMSW*`` results
  folder, loaded as ``nnunet-moe benchmark`` loads one (``command.load_predictor``: nnU-Net's
  ``nnUNetPredictor.initialize_from_trained_model_folder``); Dice is reported when labels are given.
- self-contained (no ``--model-folder``): images/labels from ``--images``/``--labels`` (default: the
  CHAOS T2 MRI copy in ``../shared/data/chaos_t2`` if present, else the bundled hippocampus); the
  stock ``nnUNetv2_plan_and_preprocess --no_pp`` plans them in a temporary folder (nothing is written
  in the repository) and an NMSW network is built from those plans with *untrained* (seeded) weights.
  Only time / FLOPs / memory are meaningful then (no Dice), and NMSW is forced to run exactly K local
  patches (``infer_only_foreground`` and background masking off): with untrained weights the global
  net sees no foreground and would otherwise skip every local pass.

Per case, both modes get the same preprocessed tensor (nnU-Net's ``DefaultPreprocessor.run_case``)
and run through the real ``nnUNetPredictor.predict_sliding_window_return_logits``: with the NMSW
network it dispatches to NMSW (``nnunet_moe.inference.nmsw_predictor``), with the NMSW model's local
network alone it is nnU-Net's sliding window (Gaussian weighting, step 0.5). Mirroring TTA is off for
both (``--tta`` turns it on for both). Seconds: wall clock of that call (after one FLOP-count
pass of each network, the warm-up); FLOPs: ``cost.count_flops`` (2 per multiply-accumulate) of one
local-network patch, one global-network pass and the objectness head, times the passes each mode
actually ran (forward hooks count them in the timed call); peak memory: ``cost.measure`` (CPU: peak of torch allocations during
one extra profiled call; ``--no-memory`` skips it). Dice: ``metrics.case_metrics`` per foreground label on
the case's original geometry (nnU-Net's export resampling; a label absent from both prediction and
reference scores 1), mean over labels and cases.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from nnunet_moe.benchmark.command import MODES, BenchmarkOptions, Case, load_predictor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CHAOS = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "chaos_t2"))
BUNDLED_HIPPOCAMPUS = os.path.join(REPO_ROOT, "nnunet_moe", "data", "hippocampus")
BENCH_DATASET_ID = 987


@dataclass
class ModeResult:
    seconds: List[float] = field(default_factory=list)
    flops: List[float] = field(default_factory=list)
    peak_bytes: List[float] = field(default_factory=list)
    dice: List[float] = field(default_factory=list)
    local_passes: List[int] = field(default_factory=list)


# ----------------------------------------------------------------------------- inputs
def find_cases(images: str, labels: Optional[str], limit: Optional[int]) -> List[Case]:
    """Single-channel cases: ``<case>.nii.gz`` or ``<case>_0000.nii.gz`` images, ``<case>.nii.gz`` labels.

    Not ``command.cases_from_folders``: that one takes nnU-Net's ``<case>_<XXXX><ending>`` naming only
    (ending from a dataset.json, labels required), while the bundled and shared data folders this
    benchmark defaults to name their images ``<case>.nii.gz``."""
    if not os.path.isdir(images):
        raise ValueError(f"--images {images!r} is not a folder")
    if labels is not None and not os.path.isdir(labels):
        raise ValueError(f"--labels {labels!r} is not a folder")
    cases = []
    for file in sorted(os.listdir(images)):
        ending = next((e for e in (".nii.gz", ".nii") if file.endswith(e)), None)
        if ending is None:
            continue
        stem = file[: -len(ending)]
        identifier = stem[:-5] if stem.endswith("_0000") else stem
        label = os.path.join(labels, identifier + ending) if labels else None
        if label is not None and not os.path.isfile(label):
            raise ValueError(f"no label file {label} for image {os.path.join(images, file)}")
        cases.append(Case(identifier, [os.path.abspath(os.path.join(images, file))],
                          label and os.path.abspath(label)))
    if not cases:
        raise ValueError(f"no .nii/.nii.gz images in {images}")
    return cases[:limit] if limit else cases


def plan_in_temp_dir(cases: List[Case], work: str) -> str:
    """Stock ``nnUNetv2_plan_and_preprocess --no_pp`` on ``cases`` in ``work``; returns the plans folder."""
    import SimpleITK as sitk

    raw = os.path.join(work, "nnUNet_raw", f"Dataset{BENCH_DATASET_ID}_NMSWBench")
    os.makedirs(os.path.join(raw, "imagesTr"))
    os.makedirs(os.path.join(raw, "labelsTr"))
    max_label = 1
    for case in cases:
        if case.label_file is None:
            raise ValueError("the self-contained mode plans with nnU-Net and needs --labels")
        os.symlink(case.image_files[0], os.path.join(raw, "imagesTr", f"{case.identifier}_0000.nii.gz"))
        os.symlink(case.label_file, os.path.join(raw, "labelsTr", f"{case.identifier}.nii.gz"))
        # GetArrayFromImage, not ...View...: a view of a temporary image dangles once it is freed (segfault)
        max_label = max(max_label, int(sitk.GetArrayFromImage(sitk.ReadImage(case.label_file)).max()))
    labels = {"background": 0, **{f"label_{i}": i for i in range(1, max_label + 1)}}
    with open(os.path.join(raw, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "image"}, "labels": labels, "numTraining": len(cases),
                   "file_ending": ".nii.gz"}, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}  # n_proc_DA=0 breaks planning
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = os.path.join(work, var)
        os.makedirs(env[var], exist_ok=True)
    command = [os.path.join(os.path.dirname(sys.executable), "nnUNetv2_plan_and_preprocess"), "-d",
               str(BENCH_DATASET_ID), "-c", "3d_fullres", "--no_pp", "-npfp", "2"]
    proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}")
    return os.path.join(env["nnUNet_preprocessed"], f"Dataset{BENCH_DATASET_ID}_NMSWBench")


def untrained_predictor(plans_folder: str, seed: int):
    """An ``nnUNetPredictor`` holding an NMSW network built by ``nnUNetTrainerNMSW`` from the plans."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_moe.training.nmsw_trainer import nnUNetTrainerNMSW

    with open(os.path.join(plans_folder, "nnUNetPlans.json")) as f:
        plans_manager = PlansManager(json.load(f))
    with open(os.path.join(plans_folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    configuration = plans_manager.get_configuration("3d_fullres")
    torch.manual_seed(seed)
    n_in = determine_num_input_channels(plans_manager, configuration, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = nnUNetTrainerNMSW.build_network_architecture(plans_manager, configuration, n_in, n_out, False)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration, [network.state_dict()], dataset_json,
                                    nnUNetTrainerNMSW.__name__, (0, 1, 2))
    return predictor


def trained_predictor(model_folder: str, fold: str, checkpoint: str, tta: bool):
    """The trained fold's ``nnUNetPredictor`` on the CPU, loaded as ``nnunet-moe benchmark`` loads it."""
    import nnunet_moe.training.nmsw_trainer  # noqa: F401  (registers NMSW trainers, installs the override)

    return load_predictor(model_folder, fold, BenchmarkOptions(checkpoint=checkpoint, tta=tta))


# ----------------------------------------------------------------------------- measuring
class LocalPassCounter:
    """Counts patches the local network processes (forward hook)."""

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.count += int(inputs[0].shape[0])

    def remove(self):
        self.handle.remove()


def patch_flops(module: torch.nn.Module, shape, in_channels: int) -> int:
    """FLOPs of one forward pass of ``module`` on a ``(1, in_channels, *shape)`` zero tensor."""
    from nnunet_moe.benchmark.cost import count_flops

    return count_flops(module, torch.zeros(1, in_channels, *shape))


def run_mode(predictor, mode: str, k: int, local_net, global_net, data: torch.Tensor, memory: bool):
    """One timed ``predict_sliding_window_return_logits`` call in ``mode`` ("nmsw" / "sliding_window").

    The predictor is switched with the benchmark command's modes (``command.MODES``). Returns logits,
    seconds, peak bytes (one extra profiled call; None without ``memory``), and the numbers of local-
    and global-network samples processed in the timed call (forward hooks)."""
    from nnunet_moe.benchmark.cost import measure

    local_counter, global_counter = LocalPassCounter(local_net), LocalPassCounter(global_net)
    outputs = []
    try:
        with MODES[mode].active(predictor, BenchmarkOptions(nmsw_k=k)):
            cost = measure(lambda x: outputs.append(predictor.predict_sliding_window_return_logits(x)), data,
                           device="cpu", repeats=1) if memory else None
            if cost is None:
                import time

                start = time.perf_counter()
                outputs.append(predictor.predict_sliding_window_return_logits(data))
                cost = {"seconds": time.perf_counter() - start, "peak_memory_bytes": None}
    finally:
        local_counter.remove()
        global_counter.remove()
    calls = 2 if memory else 1  # measure() runs the call once more under the profiler
    return (outputs[0], cost["seconds"], cost["peak_memory_bytes"], local_counter.count // calls,
            global_counter.count // calls)


def benchmark(predictor, cases: List[Case], trained: bool, k: int, tta: bool, memory: bool = True,
              log=print) -> dict:
    import contextlib
    import io

    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    from nnunet_moe.benchmark.metrics import case_metrics

    from nnunet_moe.networks.nmsw import NMSWNet
    from nnunet_moe.networks.unwrap import unwrap_network

    network = unwrap_network(predictor.network)
    if not isinstance(network, NMSWNet):
        raise ValueError(f"the model's network is {type(network).__name__}, not an NMSW-Net "
                         f"(nnunet_moe.networks.nmsw.NMSWNet); train it with -tr nnUNetTrainerNMSW")
    network.eval()
    if not trained:  # untrained global net sees no foreground: force exactly K local passes
        network.infer_only_foreground = False
        network.mask_background = False
    predictor.use_mirroring = tta
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    reader = predictor.plans_manager.image_reader_writer_class()
    labels = predictor.label_manager.foreground_labels
    results = {"nmsw": ModeResult(), "sliding_window": ModeResult()}
    shapes = []
    # FLOPs = passes x FLOPs of one pass (every local pass is one patch, every global pass one
    # global_input_size volume); exact for both modes, and far cheaper on a CPU than counting whole runs.
    # Aggregation, resizing and the objectness head (tiny convs on the global grid) are included once
    # per global pass via the objectness head; Gaussian blending adds no multiply-accumulates.
    in_channels = network.in_channels
    local_flops = patch_flops(network.local_net, network.patch_size, in_channels)
    global_flops = patch_flops(network.global_net, network.global_input_size, in_channels)
    head_flops = count_flops_head(network)
    for case in cases:
        data, _, properties = preprocessor.run_case(case.image_files, None, predictor.plans_manager,
                                                    predictor.configuration_manager, predictor.dataset_json)
        data = torch.from_numpy(data).float()
        shapes.append(tuple(data.shape[1:]))
        reference = reader.read_seg(case.label_file)[0][0] if case.label_file and trained else None
        for mode in ("nmsw", "sliding_window"):
            with contextlib.redirect_stdout(io.StringIO()):  # the override's per-case log line
                logits, seconds, peak, passes, global_passes = run_mode(predictor, mode, k, network.local_net,
                                                                        network.global_net, data, memory)
            flops = passes * local_flops + global_passes * (global_flops + head_flops)
            result = results[mode]
            result.flops.append(flops)
            result.seconds.append(seconds)
            result.peak_bytes.append(peak)
            result.local_passes.append(passes)
            if reference is not None:
                segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
                    logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager,
                    properties)
                # metrics.py's convention (a label absent from both maps scores 1), as in `nnunet-moe
                # benchmark`: both rows then average the same (case, label) pairs
                scores = case_metrics(segmentation, reference, labels, properties["spacing"], metrics=("dice",))
                result.dice.extend(score["dice"] for score in scores.values())
            log(f"  {case.identifier} {mode:>14}: shape {tuple(data.shape[1:])}, {seconds:.2f} s, "
                f"{flops / 1e9:.1f} GFLOPs, {passes} local-network patches")
    return {"results": results, "shapes": shapes}


# ----------------------------------------------------------------------------- report
def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else float("nan")


def count_flops_head(network) -> int:
    """FLOPs of the objectness head on the global grid (small next to the networks)."""
    from nnunet_moe.benchmark.cost import count_flops

    low = torch.zeros(1, network.num_classes, *network.global_input_size)
    x_low = torch.zeros(1, network.in_channels, *network.global_input_size)
    return count_flops(network.objectness_head, low, x_low)


def markdown_table(report: dict, k: int, trained: bool, patch, tta: bool) -> str:
    nmsw, sw = report["results"]["nmsw"], report["results"]["sliding_window"]
    rows = ["| inference | patches per case (local net) | seconds / case | GFLOPs / case | peak memory (MiB) | "
            "Dice |", "|---|---|---|---|---|---|"]
    for label, result in ((f"NMSW (global + top-K, K={k})", nmsw), ("nnU-Net sliding window (step 0.5)", sw)):
        dice = f"{_mean(result.dice):.3f}" if result.dice else "n/a"
        peaks = [p for p in result.peak_bytes if p is not None]
        peak = f"{max(peaks) / 2 ** 20:.0f}" if peaks else "not measured"
        rows.append(f"| {label} | {_mean(result.local_passes):.1f} | {_mean(result.seconds):.2f} | "
                    f"{_mean(result.flops) / 1e9:.1f} | {peak} | {dice} |")
    speedup = _mean(sw.seconds) / _mean(nmsw.seconds)
    flop_cut = 1.0 - _mean(nmsw.flops) / _mean(sw.flops)
    dice_gap = (_mean(sw.dice) - _mean(nmsw.dice)) * 100 if nmsw.dice and sw.dice else float("nan")
    lines = ["\n".join(rows), "",
             f"Speed-up {speedup:.2f}x (goal >= 5x: {'met' if speedup >= 5 else 'not met'}); "
             f"FLOPs {flop_cut * 100:.1f} % fewer (goal >= 80 %: {'met' if flop_cut >= 0.8 else 'not met'}); "
             + (f"Dice gap {dice_gap:+.2f} points (sliding window - NMSW; goal <= 1: "
                f"{'met' if dice_gap <= 1 else 'not met'})." if not math.isnan(dice_gap) else
                "Dice: not measured (untrained weights: time/FLOPs/memory only)."),
             f"Cases: {len(report['shapes'])}, preprocessed shapes {report['shapes']}, patch {list(patch)}; "
             f"same local-network weights in both rows; mirroring TTA {'on' if tta else 'off'}; CPU, "
             f"{torch.get_num_threads()} threads; weights "
             f"{'trained' if trained else 'untrained (seeded), NMSW forced to K local passes'}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunet_moe.benchmark.nmsw_bench",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-folder",
                        help="trained nnUNetTrainerNMSW* results folder (<trainer>__nnUNetPlans__3d_fullres)")
    parser.add_argument("--fold", default="0")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--images", help="image folder (<case>.nii.gz or <case>_0000.nii.gz, one channel)")
    parser.add_argument("--labels", help="label folder (<case>.nii.gz)")
    parser.add_argument("--num-cases", type=int, default=1, help="first N cases (default 1; 0 = all)")
    parser.add_argument("-k", type=int, default=5, help="NMSW local patches per volume (default 5, paper)")
    parser.add_argument("--tta", action="store_true", help="mirroring test-time augmentation in both modes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory run (one extra profiled call per case and mode)")
    args = parser.parse_args(argv)
    if args.k <= 0:
        parser.error(f"-k must be >= 1, got {args.k}")
    if args.num_cases < 0:
        parser.error(f"--num-cases must be >= 0, got {args.num_cases}")

    trained = args.model_folder is not None
    images, labels = args.images, args.labels
    if images is None:
        if trained:
            parser.error("--model-folder needs --images (and --labels for Dice)")
        source = DEFAULT_CHAOS if os.path.isdir(DEFAULT_CHAOS) else BUNDLED_HIPPOCAMPUS
        images, labels = os.path.join(source, "images"), os.path.join(source, "labels")
    cases = find_cases(images, labels, args.num_cases or None)
    work = None
    try:
        if trained:
            predictor = trained_predictor(args.model_folder, args.fold, args.checkpoint, args.tta)
        else:
            work = tempfile.mkdtemp(prefix="nmsw_bench_")
            print(f"Self-contained mode: planning {len(cases)} case(s) from {images} with stock nnU-Net in {work}; "
                  f"untrained NMSW weights (time/FLOPs/memory only, no Dice).")
            predictor = untrained_predictor(plan_in_temp_dir(cases, work), args.seed)
        patch = predictor.configuration_manager.patch_size
        print(f"Patch {list(patch)}, {len(cases)} case(s), K={args.k}")
        report = benchmark(predictor, cases, trained, args.k, args.tta, memory=not args.no_memory)
        print()
        print(markdown_table(report, args.k, trained, patch, args.tta))
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
