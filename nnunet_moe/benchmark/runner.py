"""Running and measuring one model in one inference mode on every case (``nnunet-moe benchmark``).

``CaseRunner`` is nnU-Net's inference pipeline for one case, sequentially in this process: read the
image files (the plans' reader), preprocess (``preprocessor.run_case_npy``), network inference
(``predictor.predict_logits_from_preprocessed_data``), export (``export_prediction_from_logits``).
It records each call's stage seconds and how many samples went through the mode's patch network.
``benchmark_model`` runs it under ``cost.measure`` (the first case once more beforehand as an untimed
warm-up), counts FLOPs with ``cost.count_flops`` around the network inference of each case, scores
the written prediction and returns report rows plus one record per case.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

from nnunet_moe.benchmark.cost import (PeakMemory, count_flops, count_parameters, heap_in_use_bytes, measure,
                                       resident_bytes)
from nnunet_moe.benchmark.metrics import aggregate, case_metrics_from_files
from nnunet_moe.benchmark.report import rows_from_aggregate

MIB = 1024 ** 2


class CaseRunner:
    """Runs one case through read -> preprocess -> network -> export; records stage seconds and patches."""

    def __init__(self, predictor, patch_network):
        self.predictor = predictor
        self.reader = predictor.plans_manager.image_reader_writer_class()
        self.preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
        self.calls = []  # per call: {"stage_seconds": {...}, "patches": samples through patch_network}
        self.last_data = None
        self._patches = 0
        self._hook = patch_network.register_forward_hook(self._count)

    def _count(self, module, inputs, output):
        self._patches += int(inputs[0].shape[0])

    def close(self) -> None:
        self._hook.remove()

    def __call__(self, case, output_truncated: str) -> None:
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
        self._patches = 0
        logits = p.predict_logits_from_preprocessed_data(data).cpu()  # .cpu() waits for the device
        t3 = time.perf_counter()
        patches = self._patches
        export_prediction_from_logits(logits, properties, p.configuration_manager, p.plans_manager, p.dataset_json,
                                      output_truncated, False)
        t4 = time.perf_counter()
        self.calls.append({"stage_seconds": {"read": t1 - t0, "preprocess": t2 - t1, "network": t3 - t2,
                                             "export": t4 - t3}, "patches": patches})
        self.last_data = data


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def _mean(values: list):
    return sum(values) / len(values) if values else None


def _unscored(labels: list) -> dict:
    return {label: {"dice": math.nan, "hd95": math.nan, "nsd": math.nan} for label in labels}


def _scores(record: dict, label_list: list) -> dict:
    return {label: record["metrics"][str(label)] for label in label_list}


def _measure_case(name, params, session, runner, predictor, mode, case, options, label_list, prediction_dir,
                  file_ending, flops_by_shape, warmup: int, score: bool) -> dict:
    """One case: timed (after ``warmup`` untimed runs), FLOPs, scores; the per-case record."""
    output_truncated = os.path.join(prediction_dir, case.identifier)
    rss = PeakMemory("cpu", kind="rss") if options.memory_growth else contextlib.nullcontext()
    with rss:
        runner.calls.clear()
        cost = measure(runner, case, output_truncated, device=options.device, repeats=1, warmup=warmup,
                       memory=options.memory)
        timed = runner.calls[warmup]  # the timed call (warm-up first, memory run after)
        data = runner.last_data
        shape = tuple(data.shape)
        if not options.flops:
            flops = None
        elif mode.cache_flops_by_shape and shape in flops_by_shape:
            flops = flops_by_shape[shape]
        else:
            flops = count_flops(predictor.predict_logits_from_preprocessed_data, data)
            flops_by_shape[shape] = flops
        runner.last_data = data = None
        scores = case_metrics_from_files(case.label_file, output_truncated + file_ending, label_list,
                                         reader=runner.reader, nsd_tolerance_mm=options.nsd_tolerance_mm) \
            if score else _unscored(label_list)
    peak = cost["device_peak_memory_bytes"] if cost["device_peak_memory_bytes"] is not None \
        else cost["peak_memory_bytes"]
    record = {"model": name, "mode": mode.name, "case": case.identifier, "seconds": cost["seconds"],
              "stage_seconds": timed["stage_seconds"], "patches": timed["patches"], "peak_memory_bytes": peak,
              "peak_memory_above_start_bytes": cost["peak_memory_bytes"], "flops": flops,
              "preprocessed_shape": list(shape), "metrics": {str(label): values for label, values in scores.items()},
              "params": params, "session": session}
    if options.memory_growth:  # the process's resident memory: what a leak across cases would raise
        record["rss_peak_bytes"] = rss.absolute_peak_bytes
        record["rss_after_bytes"] = resident_bytes()
        record["heap_after_bytes"] = heap_in_use_bytes()
    return record


def mode_rows(name: str, mode_name: str, records: list, label_list: list, class_names: dict, score: bool,
              say) -> list:
    """Report rows (one per label) of one model in one mode from its per-case records."""
    seconds = _mean([r["seconds"] for r in records])
    mean_flops = _mean([r["flops"] for r in records if r["flops"] is not None])
    peaks = [r["peak_memory_bytes"] for r in records if r["peak_memory_bytes"] is not None]
    aggregated = aggregate([_scores(r, label_list) for r in records])
    params = records[0]["params"]
    quality = f"mean Dice {aggregated['foreground_mean']['dice']:.4f}" if score else "not scored"
    say(f"{name} ({mode_name}): {quality}, {seconds:.3f} s/case, {params} parameters")
    return rows_from_aggregate(name, mode_name, aggregated, class_names, params=params,
                               flops=int(round(mean_flops)) if mean_flops is not None and math.isfinite(mean_flops)
                               else None, seconds_per_case=seconds, peak_memory_mb=max(peaks) / MIB if peaks else None,
                               patches_per_case=_mean([r["patches"] for r in records]))


def benchmark_model(name, mode, predictor, cases, options, label_list, class_names, out_dir, file_ending, bar, say,
                    score: bool = True, journal=None):
    """Rows (one per label) and per-case records of one model in one mode; ``score=False``: metrics "n/a".

    With a ``journal`` (``journal.Journal``) a case it already holds is taken from it, not run again, and
    every new record is appended to it as soon as it is measured.
    """
    prediction_dir = os.path.join(out_dir, "predictions", safe_name(f"{name}__{mode.name}"))
    os.makedirs(prediction_dir, exist_ok=True)
    records, flops_by_shape = [], {}
    session = journal.session if journal is not None else 0
    with mode.active(predictor, options) as network:
        params = count_parameters(network)
        runner = CaseRunner(predictor, mode.patch_network(predictor.network))
        try:
            for case in cases:
                record = journal.case_record(name, mode.name, case.identifier) if journal is not None else None
                if record is None:
                    warmup = 0 if any(r["session"] == session for r in records) else 1  # first case of this process
                    record = _measure_case(name, params, session, runner, predictor, mode, case, options,
                                           label_list, prediction_dir, file_ending, flops_by_shape, warmup, score)
                    if journal is not None:
                        journal.add_case(record)
                elif mode.cache_flops_by_shape and record["flops"] is not None:
                    flops_by_shape[tuple(record["preprocessed_shape"])] = record["flops"]
                records.append(record)
                if bar is not None:
                    bar.set_postfix_str(f"{name} {mode.name}", refresh=False)
                    bar.update(1)
        finally:
            runner.close()
    return mode_rows(name, mode.name, records, label_list, class_names, score, say), records


def run_models(models, modes, cases, options, reference, reference_path, out_dir, problems, progress, log,
               journal=None):
    """Every model in every applicable mode on every case: (report rows, per-case records).

    A model whose labels or channels differ from the reference, that fails to load, or a mode that does
    not apply or fails is appended to ``problems`` (and printed) and skipped; the others go on. With a
    ``journal``, a model it marks done is not loaded again (its rows come from its records) and each
    finished model is marked there.
    """
    import sys

    import torch

    from nnunet_moe.benchmark.models import compatibility_problem, load_json, scored_labels
    from nnunet_moe.benchmark.modes import MODES, resolve_modes

    label_list, class_names = scored_labels(reference)
    per_model = len(modes) * len(cases)
    bar, say = None, log
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(models) * per_model, desc="benchmark", unit="case", file=sys.stderr, dynamic_ncols=True)
        say = tqdm.write

    def skip(message: str, cases_left: int, own: list | None = None) -> None:
        problems.append(message)
        if own is not None:
            own.append(message)
        say(f"SKIPPED: {message}")
        if bar is not None:
            bar.update(cases_left)

    rows, records = [], []
    try:
        for model in models:
            done = journal.model_done(model.name) if journal is not None else None
            if done is not None:  # measured before the interruption
                for mode_name in done["modes"]:
                    mode_records = [journal.case_record(model.name, mode_name, c.identifier) for c in cases]
                    rows += mode_rows(model.name, mode_name, mode_records, label_list, class_names, model.scored, say)
                    records += mode_records
                for message in done["problems"]:
                    skip(message, 0)
                bar and bar.update(per_model)
                continue
            problem = compatibility_problem(model.name, load_json(model.dataset_json_path), model.dataset_json_path,
                                            reference, reference_path)
            if problem:
                skip(problem, per_model)
                continue
            try:
                predictor = model.load(options)
            except Exception as error:  # one broken model must not stop the others
                skip(f"trainer {model.name}: loading {model.source} failed: {type(error).__name__}: {error}",
                     per_model)
                continue
            resolved = resolve_modes(predictor.network, modes)
            bar and bar.update((len(modes) - len(resolved)) * len(cases))  # 'auto' duplicates collapse
            own_problems, finished_modes = [], []
            for mode_name in resolved:
                mode = MODES[mode_name]
                reason = mode.unavailable_reason(predictor)
                if reason:
                    skip(f"trainer {model.name}, mode {mode_name}: {reason}", len(cases), own_problems)
                    continue
                try:
                    model_rows, model_records = benchmark_model(
                        model.name, mode, predictor, cases, options, label_list, class_names, out_dir,
                        reference["file_ending"], bar, say, score=model.scored, journal=journal)
                except Exception as error:
                    skip(f"trainer {model.name}, mode {mode_name}: {type(error).__name__}: {error}", 0, own_problems)
                    continue
                rows += model_rows
                records += model_records
                finished_modes.append(mode_name)
            if journal is not None:
                journal.add_model_done(model.name, finished_modes, own_problems)
            del predictor
            if options.device == "cuda":
                torch.cuda.empty_cache()
    finally:
        if bar is not None:
            bar.close()
    return rows, records
