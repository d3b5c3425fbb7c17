"""``nnunet-moe benchmark``: nnU-Net models side by side on the same cases.

For every trainer given with ``-tr`` the command loads the stock results folder
``$nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>/fold_<f>/<checkpoint>``
(``models``), predicts every case, scores it and measures its cost (``runner``), then writes one
report for all models (``report.md``, ``results.csv``, ``results.json``, ``dice_vs_time.png`` via
``report.write_reports``) plus ``per_case.json`` and the predicted segmentations.

Cases (``cases``): by default the validation cases of the fold (``splits_final.json``), or every case
of an image folder ``-i`` (nnU-Net naming ``<case>_<XXXX><ending>``) with its label ``<case><ending>``
in ``-l``; ``--num-cases N`` keeps the first N. ``--demo`` uses the held-out cases
(``imagesTs``/``labelsTs``) of the dataset written by ``nnunet-moe demo`` and every trainer that has
a checkpoint there.

Untrained weights (``untrained``): ``--untrained TRAINER`` adds TRAINER's network built from the
plans with seeded random weights (``--seed``) instead of a checkpoint; such a model is not scored
(Dice "n/a"), only its cost is. The plans are ``$nnUNet_preprocessed/DatasetXXX_Name/<plans>.json``
with ``-d``; without ``-d`` the ``-i``/``-l`` cases are planned by stock nnU-Net in a temporary
folder and nnU-Net's folder variables are not needed. This compares NMSW and the sliding window on
raw images without any training::

    nnunet-moe benchmark --untrained nnUNetTrainerNMSW -c 3d_fullres -i IMAGES -l LABELS \\
        --modes nmsw sliding_window --no-tta --num-cases 3

What is measured, per case:

* seconds: wall clock of nnU-Net's inference pipeline for one case (read, preprocess, network, export;
  ``runner.CaseRunner``), sequentially in this process; the first case of each model and mode is run
  once untimed beforehand (warm-up). ``per_case.json`` splits the time into the four stages.
* peak memory: ``cost.measure``. On CUDA the absolute ``torch.cuda.max_memory_allocated`` during the
  case (weights included); on CPU the peak of torch's tensor allocations above the level at the start
  of the case, from one extra, untimed run under the profiler (``--no-memory`` skips that run).
* FLOPs: ``cost.count_flops`` (2 per multiply-accumulate) around the network inference of the case,
  every sliding-window patch and mirrored pass or whatever the mode runs instead; exact per case
  (NMSW's work depends on the image). Sliding-window FLOPs only depend on the preprocessed shape, so
  they are counted once per shape and model.
* patches: samples through the mode's patch network in the timed run (sliding window: every tile and
  mirrored pass; NMSW: the local network's patches).
* parameters: ``cost.count_parameters`` of the network that the mode runs.
* Dice, HD95 (mm), NSD (``--nsd-tolerance`` mm) per foreground label or region:
  ``metrics.case_metrics_from_files`` on the written prediction, means over cases.

* Dice per source dataset, on a merged dataset (``nnunet-moe merge-datasets``): every case is also scored on
  only the labels its source annotates (``datasets.evaluation``), one table per model and mode in
  ``per_source.md`` and ``per_source.json``; the main tables score every case on every label.

* resident memory (``--memory-growth``): the process's RSS after every case and its peak during the case
  (``cost.PeakMemory(kind="rss")``), and the C heap in use after it (``cost.heap_in_use_bytes``); a table
  per model and mode shows whether they grow from case to case (``report.memory_growth_table``), also in
  ``memory_growth.md``.

``--no-flops`` skips the FLOP count (an extra inference per case of a new shape).
A model's row reports the mean seconds, FLOPs and patches per case and the largest peak memory.

Interrupted runs (``journal``): every case's record is appended to ``records.jsonl`` in the output folder
(fsynced) as soon as it is measured, after ``run.json`` with the run's settings. After SIGINT or SIGKILL
the same command with ``--resume`` (and ``-o`` of the interrupted run's folder) measures only what is
missing and writes the reports of the whole run; it refuses a folder whose run had other settings.
Inference modes (``--modes``, ``modes``): ``sliding_window``, ``nmsw`` (``--nmsw-k`` sets K) and ``auto``.

Bad input never stops the other models: a trainer without results folder, a fold without checkpoint,
a model whose labels or channels differ from the reference dataset's, or a mode that does not apply
is reported with what is missing and skipped. Only when no model could be evaluated does it fail.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from nnunet_moe.benchmark.cases import cases_from_folders, folder_naming, validation_cases
from nnunet_moe.benchmark.journal import RUN_FILE, Journal
from nnunet_moe.benchmark.models import (DEFAULT_CHECKPOINT, DEFAULT_PLANS, checkpoint_problem, load_json,
                                         model_folder, num_channels, resolve_dataset_name, trained_model,
                                         trained_trainers)
from nnunet_moe.benchmark.modes import AUTO_MODE, MODES, check_modes
from nnunet_moe.benchmark.runner import run_models
from nnunet_moe.benchmark.untrained import plan_cases, untrained_model
from nnunet_moe.datasets.metadata import MERGE_KEY
from nnunet_moe.demo_dataset import DEFAULT_CONFIGURATION, DEFAULT_DATASET_ID
from nnunet_moe.folders import free_folder


@dataclass
class BenchmarkOptions:
    device: str = "cpu"
    checkpoint: str = DEFAULT_CHECKPOINT
    tta: bool = True
    step_size: float = 0.5
    nmsw_k: int | None = None
    nsd_tolerance_mm: float = 1.0
    memory: bool = True
    flops: bool = True
    memory_growth: bool = False


@dataclass
class BenchmarkResult:
    rows: list
    out_dir: str | None
    paths: dict
    problems: list
    per_case: list = field(default_factory=list)


@dataclass
class Setup:
    """What one run compares: models, reference dataset.json and cases, and where results go by default."""

    dataset: str | None  # DatasetXXX_Name; None for cases planned in a temporary folder
    label: str
    models: list
    problems: list
    reference_path: str
    cases: list
    case_source: str
    default_out: str


def benchmark(dataset, configuration: str, trainers: list, fold, plans: str = DEFAULT_PLANS,
              images: str | None = None, labels: str | None = None, out: str | None = None,
              device: str = "cpu", modes: list | None = None, checkpoint: str = DEFAULT_CHECKPOINT,
              tta: bool = True, step_size: float = 0.5, nmsw_k: int | None = None, nsd_tolerance_mm: float = 1.0,
              demo: bool = False, progress: bool = True, untrained: list | None = None, seed: int = 0,
              num_cases: int | None = None, memory: bool = True, flops: bool = True, memory_growth: bool = False,
              resume: bool = False, log=print) -> BenchmarkResult:
    """Run the benchmark; see the module docstring. Returns rows, output folder, file paths and problems.

    Raises ValueError / FileNotFoundError / RuntimeError for input that stops the whole run (missing
    nnU-Net variables, unknown dataset, no cases, ``resume`` without a matching interrupted run in
    ``out``), and RuntimeError when no model could be evaluated. KeyboardInterrupt (SIGINT) is re-raised
    after saying how to resume; every case measured until then is kept.
    """
    from nnunet_moe.nnunet_paths import require_nnunet_paths

    folders = require_nnunet_paths("nnunet-moe benchmark") if dataset is not None else None
    fold = None if fold is None else str(fold)
    options = _checked_options(fold, images, labels, device, step_size, nmsw_k, num_cases, dataset, trainers,
                               untrained, BenchmarkOptions(device, checkpoint, tta, step_size, nmsw_k,
                                                           nsd_tolerance_mm, memory, flops, memory_growth))
    modes = check_modes(modes)
    if resume and out is not None:
        Journal.interrupted_run(out)  # before the setup (planning can take a while): is there a run to resume?
    with tempfile.TemporaryDirectory(prefix="nnunet_moe_benchmark_") as work:  # plans of cases without a dataset
        if dataset is None:
            setup = _planned_setup(untrained, images, labels, configuration, seed, num_cases, work)
        else:
            setup = _dataset_setup(folders, dataset, configuration, list(trainers or []), fold, plans, checkpoint,
                                   images, labels, demo, list(untrained or []), seed, num_cases, log)
        settings = _settings(setup, configuration, plans, fold, untrained, seed, modes, options)
        journal = _journal(out or setup.default_out, settings, resume, log)
        out_dir = journal.out_dir
        title = (f"{setup.label}: {len(setup.cases)} cases ({setup.case_source}), {device}, "
                 f"TTA {'on' if tta else 'off'}"
                 + (f", untrained (seeded, seed {seed}) weights for {', '.join(untrained)}" if untrained else ""))
        log(f"Benchmark: {title}")
        log(f"Results will go to {out_dir}")
        reference = load_json(setup.reference_path)
        try:
            rows, per_case = run_models(setup.models, modes, setup.cases, options, reference, setup.reference_path,
                                        out_dir, setup.problems, progress, log, journal)
        except KeyboardInterrupt:
            journal.close()
            log(f"Interrupted: the cases measured so far are kept in {out_dir}; continue with the same command "
                f"and --resume -o {out_dir}")
            raise
        if not rows:
            journal.close()
            if journal.session == 0:  # this call made the folder and nothing was measured: leave nothing behind
                shutil.rmtree(out_dir)
            raise RuntimeError("no model could be evaluated:\n  " + "\n  ".join(setup.problems))
        paths = _write_outputs(rows, per_case, setup.problems,
                               {**settings, "reference_dataset_json": setup.reference_path}, out_dir, title, log)
        if MERGE_KEY in reference:
            paths.update(_per_source_outputs(per_case, reference, {m.name for m in setup.models if m.scored},
                                             out_dir, title, log))
        journal.finish()
    return BenchmarkResult(rows, out_dir, paths, setup.problems, per_case)


def _settings(setup, configuration, plans, fold, untrained, seed, modes, options) -> dict:
    """What makes two runs' numbers comparable (``--resume`` refuses a folder whose run had others)."""
    import torch

    return {"dataset": setup.dataset, "configuration": configuration, "plans": plans, "fold": fold,
            "models": [m.name for m in setup.models], "untrained": untrained, "seed": seed, "modes": modes,
            "case_source": setup.case_source, "cases": [c.identifier for c in setup.cases], **vars(options),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def _journal(out: str, settings: dict, resume: bool, log) -> Journal:
    """The interrupted run in ``out`` (``resume``), else a new run in ``out`` or, when it exists, ``out_2``..."""
    if resume:
        return Journal.resume(out, settings, log)
    out_dir = free_folder(out)
    if out_dir != out and os.path.isfile(os.path.join(out, RUN_FILE)) and not load_json(
            os.path.join(out, RUN_FILE)).get("finished"):
        log(f"{out} holds an interrupted run; it is left as it is (add --resume to continue it)")
    return Journal.start(out_dir, settings)


def _checked_options(fold, images, labels, device, step_size, nmsw_k, num_cases, dataset, trainers, untrained,
                     options):
    """``options`` once every setting is valid (the only place they are checked); ValueError otherwise."""
    import torch

    if fold is not None and fold != "all" and not fold.isdigit():
        raise ValueError(f"-f {fold!r}: a fold is a non-negative integer or 'all'")
    if (images is None) != (labels is None):
        raise ValueError("give both -i IMAGES and -l LABELS, or neither (then the fold's validation cases are used)")
    if fold is None and (trainers or images is None):
        raise ValueError("-f FOLD is needed for trained models (-tr) and for the fold's validation cases")
    if dataset is None and not (untrained and images is not None and not trainers):
        raise ValueError("without -d only --untrained TRAINER with -i IMAGES -l LABELS can run (the cases are "
                         "planned in a temporary folder); trained models (-tr) need their dataset -d")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    if not 0 < step_size <= 1:
        raise ValueError(f"--step-size {step_size}: nnU-Net's tile step size must be in (0, 1]")
    if nmsw_k is not None and nmsw_k < 1:
        raise ValueError(f"--nmsw-k {nmsw_k}: K must be a positive integer")
    if num_cases is not None and num_cases < 1:
        raise ValueError(f"--num-cases {num_cases}: must be a positive integer")
    if options.memory_growth and not os.path.exists("/proc/self/clear_refs"):
        raise ValueError("--memory-growth reads the resident memory from Linux's /proc/self (clear_refs, status), "
                         "which this system does not have; run without --memory-growth")
    return options


def _dataset_setup(folders, dataset, configuration, trainers, fold, plans, checkpoint, images, labels, demo, untrained,
                   seed, num_cases, log) -> Setup:
    """Trained models of ``-tr`` (and untrained ones from the dataset's plans) on the dataset's or ``-i`` cases."""
    name = resolve_dataset_name(dataset, folders)
    raw, preprocessed = (os.path.join(folders[var], name) for var in ("nnUNet_raw", "nnUNet_preprocessed"))
    if demo and not trainers:
        trainers = trained_trainers(folders["nnUNet_results"], name, plans, configuration, fold, checkpoint)
        if not trainers:
            raise RuntimeError(
                f"no trained model for the demo dataset: nothing in {os.path.join(folders['nnUNet_results'], name)}"
                f" has {plans}__{configuration}/fold_{fold}/{checkpoint}. Run `nnunet-moe demo` first.")
        log(f"Demo: trainers with a {configuration} fold {fold} checkpoint: {', '.join(trainers)}")
    if not trainers and not untrained:
        raise ValueError("no trainer given: pass -tr TRAINER [TRAINER ...]")
    models, problems = [], []
    for trainer in trainers:
        problem = checkpoint_problem(model_folder(folders["nnUNet_results"], name, trainer, plans, configuration),
                                     trainer, fold, checkpoint, name, configuration, plans)
        if problem:
            problems.append(problem)
            log(f"SKIPPED: {problem}")
        else:
            models.append(trained_model(folders["nnUNet_results"], name, trainer, plans, configuration, fold))
    plans_file, plans_json = os.path.join(preprocessed, f"{plans}.json"), os.path.join(preprocessed, "dataset.json")
    for trainer in untrained:
        if not os.path.isfile(plans_file) or not os.path.isfile(plans_json):
            problems.append(f"untrained {trainer}: no plans {plans_file} with its dataset.json (plan the dataset "
                            f"with `nnUNetv2_plan_and_preprocess -d {name} -c {configuration}`, or check -p).")
            log(f"SKIPPED: {problems[-1]}")
        else:
            models.append(untrained_model(trainer, plans_file, plans_json, configuration, seed))
    if not models:
        raise RuntimeError("no model could be evaluated:\n  " + "\n  ".join(problems))
    reference_path = next((p for p in (os.path.join(raw, "dataset.json"), plans_json) if os.path.isfile(p)),
                          models[0].dataset_json_path)  # only a results folder: the first model's dataset
    reference = load_json(reference_path)
    ending, channels = reference["file_ending"], num_channels(reference)
    if images is not None:
        cases, case_source = cases_from_folders(images, labels, ending, channels), f"{images}"
    elif demo and os.path.isdir(os.path.join(raw, "imagesTs")):
        cases = cases_from_folders(os.path.join(raw, "imagesTs"), os.path.join(raw, "labelsTs"), ending, channels)
        case_source = "demo held-out cases (imagesTs)"
    else:
        cases = validation_cases(raw, preprocessed, fold, ending, channels)
        case_source = f"fold {fold} validation cases"
    if not cases:
        raise ValueError(f"no cases to evaluate ({case_source})")
    label = f"{name} {configuration}" + (f" fold {fold}" if fold is not None else "")
    default_out = os.path.join(folders["nnUNet_results"], name, f"benchmark_{configuration}_" +
                               (f"fold{fold}" if fold is not None else "untrained"))
    return Setup(name, label, models, problems, reference_path, cases[:num_cases], case_source, default_out)


def _planned_setup(untrained, images, labels, configuration, seed, num_cases, work) -> Setup:
    """Untrained models on ``-i``/``-l`` cases that stock nnU-Net plans in the temporary folder ``work``."""
    ending, channels = folder_naming(images, labels)
    cases = cases_from_folders(images, labels, ending, channels)[:num_cases]
    plans_file, plans_json = plan_cases(cases, ending, channels, configuration, work)
    models = [untrained_model(trainer, plans_file, plans_json, configuration, seed) for trainer in untrained]
    return Setup(None, f"{configuration} planned from the cases", models, [], plans_json, cases, images,
                 os.path.abspath(f"benchmark_{configuration}_untrained"))


def _write_outputs(rows, per_case, problems, settings, out_dir, title, log) -> dict:
    from nnunet_moe.benchmark.report import markdown_tables, memory_growth_table, write_reports

    paths = write_reports(rows, out_dir, title)
    paths["per_case"] = os.path.join(out_dir, "per_case.json")
    with open(paths["per_case"], "w") as f:
        json.dump({"settings": settings, "problems": problems, "cases": per_case}, f, indent=2, default=str)
    log("")
    log(markdown_tables(rows))
    growth = memory_growth_table(per_case)
    if growth:
        paths["memory_growth"] = os.path.join(out_dir, "memory_growth.md")
        with open(paths["memory_growth"], "w") as f:
            f.write(f"# Resident memory over the cases: {title}\n\n{growth}\n")
        log(f"Resident memory (RSS) of this process after each case:\n\n{growth}\n")
    if problems:
        log(f"{len(problems)} model(s)/mode(s) skipped:")
        for message in problems:
            log(f"  - {message}")
    log(f"Report: {paths['markdown']}\nCSV: {paths['csv']}\nJSON: {paths['json']}\nPlot: {paths['png']}\n"
        f"Per case: {paths['per_case']}")
    return paths


def _per_source_outputs(per_case, reference, scored, out_dir, title, log) -> dict:
    """Dice per source of every scored model and mode (the cases' benchmark Dice, sorted by source)."""
    from nnunet_moe.benchmark.journal import write_json_atomic
    from nnunet_moe.datasets.evaluation import per_source_dice, per_source_markdown

    groups = {}
    for record in per_case:
        if record["model"] in scored:
            groups.setdefault(f"{record['model']} ({record['mode']})", {})[record["case"]] = {
                int(label): value["dice"] for label, value in record["metrics"].items()}
    if not groups:
        return {}
    summaries = {key: per_source_dice(cases, reference) for key, cases in groups.items()}
    table = per_source_markdown(summaries)
    paths = {"per_source": os.path.join(out_dir, "per_source.md"),
             "per_source_json": os.path.join(out_dir, "per_source.json")}
    with open(paths["per_source"], "w") as f:
        f.write(f"# Dice per source dataset, each case on its source's labels only: {title}\n\n{table}\n")
    write_json_atomic(paths["per_source_json"], summaries)
    log(f"Dice per source dataset (each case scored only on the labels its source annotates):\n\n{table}\n"
        f"Per source: {paths['per_source']}")
    return paths


# ----------------------------------------------------------------------------------------- CLI
def add_benchmark_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``benchmark`` subcommand to the ``nnunet-moe`` parser's subparsers."""
    parser = subparsers.add_parser(
        "benchmark", help="models side by side: Dice/HD95/NSD, parameters, FLOPs, patches, time and memory per case",
        description="Predict the same cases with several trained nnU-Net models (stock results folders), or with "
                    "untrained networks built from the plans (--untrained), and write a Markdown/CSV/JSON/PNG "
                    "report. Without -i/-l the fold's validation cases are used.",
        epilog="NMSW against the sliding window on raw images, no training (cost only): nnunet-moe benchmark "
               "--untrained nnUNetTrainerNMSW -c 3d_fullres -i IMAGES -l LABELS --modes nmsw sliding_window "
               "--no-tta --num-cases 3")
    parser.add_argument("-d", "--dataset", "--dataset-id", dest="dataset", default=None,
                        help="dataset id or DatasetXXX_Name (required unless --demo or --untrained with -i/-l; "
                             "--demo default: %d)" % DEFAULT_DATASET_ID)
    parser.add_argument("-c", "--configuration", default=None,
                        help="e.g. 3d_fullres (--demo default: %s)" % DEFAULT_CONFIGURATION)
    parser.add_argument("-tr", "--trainers", nargs="+", default=None, metavar="TRAINER",
                        help="trainer names, as given to nnUNetv2_train -tr (--demo: every trained one)")
    parser.add_argument("-f", "--fold", default=None, help="fold (0-4 or all; --demo default: 0)")
    parser.add_argument("-p", "--plans", default=DEFAULT_PLANS, help="plans identifier (default: %(default)s)")
    parser.add_argument("-i", "--images", default=None, help="image folder (<case>_<XXXX><ending>); needs -l")
    parser.add_argument("-l", "--labels", default=None, help="label folder (<case><ending>); needs -i")
    parser.add_argument("--num-cases", type=int, default=None, help="only the first N cases (default: all)")
    parser.add_argument("-o", "--out", default=None,
                        help="output folder (default: $nnUNet_results/DatasetXXX_Name/benchmark_<config>_fold<f>; "
                             "without -d ./benchmark_<config>_untrained); an existing folder is never overwritten: "
                             "_2, _3... is appended (--resume continues the interrupted run in it instead)")
    parser.add_argument("--untrained", nargs="+", default=None, metavar="TRAINER",
                        help="also benchmark these trainers' networks built from the plans with seeded random "
                             "weights, no checkpoint (cost only: not scored). Plans: the dataset's (-d), or without "
                             "-d the -i/-l cases planned by stock nnU-Net in a temporary folder")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of --untrained weights (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: %(default)s)")
    parser.add_argument("--modes", nargs="+", default=[AUTO_MODE], choices=[AUTO_MODE, *MODES],
                        help="inference modes run side by side on every model (default: auto = nmsw for NMSW "
                             "models, sliding_window otherwise)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint file (default: %(default)s)")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="no mirroring test-time augmentation")
    parser.add_argument("--step-size", type=float, default=0.5, help="sliding-window tile step (default: %(default)s)")
    parser.add_argument("--nmsw-k", type=int, default=None,
                        help="local patches per volume for mode nmsw (default: the predictor's K, 5 as in the paper)")
    parser.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD tolerance in mm (default: %(default)s)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="CPU: skip the peak-memory run (one extra profiled run per case); CUDA always measures")
    parser.add_argument("--no-flops", dest="flops", action="store_false",
                        help="skip the FLOP count (one extra inference per case of a new shape); FLOPs are then n/a")
    parser.add_argument("--memory-growth", action="store_true",
                        help="record the process's resident memory (RSS) after and during every case and the C "
                             "heap in use after it, and print a table per model: RSS after case 1, 2 and the last, "
                             "growth after case 2 of the RSS and of the heap (a leak grows the heap); also "
                             "memory_growth.md. Linux")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in -o (default: the default folder) with the same "
                             "options: cases and models it measured are kept, not run again; refused when the "
                             "options differ from that run's")
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
    """``nnunet-moe benchmark``: 0 when at least one model was evaluated (errors raise, see ``benchmark``);
    130 when interrupted by SIGINT (``benchmark`` said how to resume)."""
    try:
        return _run_benchmark(args)
    except KeyboardInterrupt:
        return 130


def _run_benchmark(args) -> int:
    dataset, configuration, fold = args.dataset, args.configuration, args.fold
    if args.demo:
        _demo_paths(args.work_dir)
        dataset = dataset if dataset is not None else str(DEFAULT_DATASET_ID)
        configuration = configuration or DEFAULT_CONFIGURATION
        fold = fold if fold is not None else "0"
    else:
        required = [("-c", configuration)]
        if not args.untrained:
            required += [("-d", dataset), ("-tr", args.trainers), ("-f", fold)]
        elif args.trainers or args.images is None:  # trained models, or the dataset's validation cases
            required += [("-d", dataset), ("-f", fold)]
        missing = sorted((flag for flag, value in required if value is None), key=["-d", "-c", "-tr", "-f"].index)
        if missing:
            raise ValueError(f"the following arguments are required without --demo: {', '.join(missing)}")
    benchmark(dataset, configuration, list(args.trainers or []), fold, plans=args.plans, images=args.images,
              labels=args.labels, out=args.out, device=args.device, modes=args.modes, checkpoint=args.checkpoint,
              tta=args.tta, step_size=args.step_size, nmsw_k=args.nmsw_k, nsd_tolerance_mm=args.nsd_tolerance,
              demo=args.demo, progress=args.progress, untrained=args.untrained, seed=args.seed,
              num_cases=args.num_cases, memory=args.memory, flops=args.flops, memory_growth=args.memory_growth,
              resume=args.resume)
    return 0
