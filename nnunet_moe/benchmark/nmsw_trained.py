"""NMSW against the sliding window with *trained* weights, on BTCV under a CPU-sized plan (a long benchmark).

``python -m nnunet_moe.benchmark.nmsw_trained --out DIR [--shared ../shared/data]``:

1. BTCV from ``../shared/data`` as an nnU-Net raw dataset (the first 18 cases train, the last 6 are held out);
2. a CPU-sized plan, made by nnU-Net's own planner: ``nnUNetv2_plan_and_preprocess -c 3d_fullres
   -overwrite_plans_name nnUNetPlansCPU -overwrite_target_spacing 2.5 2.5 2.5 -gpu_memory_target 0.5`` (coarser
   voxels and the small patch a 0.5 GB memory target gives, so that a volume spans many patch-grid cells, as
   the paper's volumes do: with K patches the ratio of local passes is at most cells / K). On the 18 BTCV
   training cases this plans a 64 x 48 x 48 patch, batch 2, and 60 / 125 / 210 cells (min / median / max;
   a 1 GB target: 80 x 56 x 64 and 27 / 64 / 100 cells, too few for K=30 to pay off);
3. ``nnUNetTrainerNMSW`` and nnU-Net's own ``nnUNetTrainerAdam1en3`` trained on fold 0 of those plans for the
   same budget (``_<E>epochs_<I>iters``, default 20 x 20 = 400 iterations, both at learning rate 1e-3: NMSW as
   ``_lr1en3``). An NMSW iteration takes about 9 s here (one whole volume through nnU-Net's augmentation, the
   global pass and 4 patches), so 400 iterations are what fits a session; at 300 iterations on hippocampus the
   paper's 3e-4 and nnU-Net's SGD 1e-2 were far behind 1e-3 (the convergence table), hence 1e-3 for both;
4. ``nnunet-moe benchmark`` on the held-out cases: NMSW at K=5 and at K=30, the same trained NMSW local
   network under nnU-Net's sliding window, and the stock nnU-Net U-Net under the sliding window. Dice per
   organ and mean, seconds per case, FLOPs, peak memory, and the patch-grid cells of each case.

``--variants nnUNetTrainerNMSWLogitsObjectness nnUNetTrainerNMSWScaledST nnUNetTrainerNMSWDetachGlobal`` also
trains each NMSW option variant (objectness from the global logits, the paper's scaled straight-through, the
authors' detached global logits in the aggregation) for the same budget and runs it at each K: the comparison of
the options on trained weights (about 1 h of training per variant on this CPU).

The goals the table is read against (issue of record): K=30 within 1 Dice point of the sliding window over
the same weights at >= 2.5x less time; K=5 >= 5x less time, its Dice loss reported. ``--demo`` runs the same
steps on the bundled hippocampus data (one-cell grids: only the mechanics, for tests).

Interrupt at any time: the plans, trainings and benchmark runs are reused or continued (``--c``, the
benchmark's ``--resume`` journal); ``nmsw_trained.json`` and ``nmsw_trained.md`` are written at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os

from nnunet_moe.benchmark.journal import RUN_FILE, write_json_atomic
from nnunet_moe.benchmark.shared_data import find_shared_data, write_shared_dataset
from nnunet_moe.nnunet_paths import set_default_paths
from nnunet_moe.stock_pipeline import ensure_plans, train_or_reuse, training_env

PLANS = "nnUNetPlansCPU"
PLANNER_ARGS = ("-overwrite_target_spacing", "2.5", "2.5", "2.5", "-gpu_memory_target", "0.5")
BTCV_ID, DEMO_ID = 604, 605
EPOCHS, ITERS = 20, 20
KS = (5, 30)
LARGE_ORGANS = ("liver", "spleen", "right kidney", "left kidney", "stomach")


def trainers(epochs: int, iters: int, variants=()) -> dict:
    """Role -> trainer name with the budget: "nmsw", "nnunet", and one entry per NMSW option variant (its class name)."""
    budget = f"_{epochs}epochs_{iters}iters"
    names = {"nmsw": "nnUNetTrainerNMSW" + budget + "_lr1en3", "nnunet": "nnUNetTrainerAdam1en3" + budget}
    names.update({variant: variant + budget + "_lr1en3" for variant in variants})
    return names


def check_variants(variants) -> list:
    """The NMSW option variants asked for, each one of our NMSW trainers other than the default; ``SystemExit``
    naming the value and the allowed names otherwise."""
    from nnunet_moe.training.catalog import trainer_names

    allowed = [n for n in trainer_names() if n.startswith("nnUNetTrainerNMSW") and n != "nnUNetTrainerNMSW"]
    wrong = [v for v in variants if v not in allowed]
    if wrong:
        raise SystemExit(f"nmsw_trained: --variants {' '.join(wrong)}: not an NMSW variant of ours; "
                         f"use any of {', '.join(allowed)}")
    return list(dict.fromkeys(variants))


def benchmark_runs(names: dict, ks, variants=()) -> list:
    """(label, trainer, mode, K) of every benchmark run: NMSW at each K, its local network under the sliding
    window, nnU-Net's U-Net, then each variant at each K."""
    runs = [("NMSW K=%d" % k, names["nmsw"], "nmsw", k) for k in ks]
    runs += [("NMSW local net, sliding window", names["nmsw"], "sliding_window", None),
             ("nnU-Net U-Net", names["nnunet"], "sliding_window", None)]
    runs += [("%s K=%d" % (v.replace("nnUNetTrainer", ""), k), names[v], "nmsw", k) for v in variants for k in ks]
    return runs


def grid_cells(shape, patch, step_size: float = 0.5) -> int:
    """Cells of nnU-Net's sliding-window grid over a preprocessed ``shape`` (its ``compute_steps_for_sliding_window``)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    padded = [max(s, p) for s, p in zip(shape, patch)]
    return math.prod(len(s) for s in compute_steps_for_sliding_window(padded, patch, step_size))


def table(summaries: list, class_rows: list, cells: dict) -> str:
    """Markdown: one row per benchmark run (model, mode, K): mean Dice, the large organs, s / case (the whole
    pipeline: reading, preprocessing, network, export) and the network's share of it, patches through the local
    network, GFLOPs, peak MiB."""
    def dice(run, organ):
        values = [r["dice"] for r in class_rows if r["run"] == run and r["class_name"] == organ and r["dice"] is not None]
        return f"{values[0]:.3f}" if values else "-"

    organs = [o for o in LARGE_ORGANS if any(r["class_name"] == o for r in class_rows)]
    head = ("| model | mode | mean Dice | " + " | ".join(organs) + " | s / case | network s / case | patches / case "
            "| GFLOPs / case | peak MiB |\n|---|---|---:|" + "---:|" * len(organs) + "---:|---:|---:|---:|---:|")
    body = []
    for s in summaries:
        fmt = lambda v, d, scale=1.0: "n/a" if v is None else f"{v / scale:.{d}f}"  # noqa: E731
        body.append(f"| {s['label']} | {s['mode']} | {fmt(s['dice'], 3)} | "
                    + " | ".join(dice(s["label"], o) for o in organs)
                    + f" | {fmt(s['seconds_per_case'], 2)} | {fmt(s['network_seconds_per_case'], 2)}"
                    + f" | {fmt(s['patches_per_case'], 1)} | {fmt(s['flops'], 0, 1e9)} | {fmt(s['peak_memory_mb'], 0)} |")
    listing = ", ".join(f"{case} {n}" for case, n in cells.items())
    return "\n".join([head] + body) + f"\n\nPatch-grid cells per held-out case: {listing}\n"


def network_seconds(per_case: list) -> float | None:
    """Mean seconds of the network stage alone (the benchmark's per-case ``stage_seconds``): reading, resampling
    and export cost the same in every mode and would hide the ratio of the networks' work."""
    values = [c["stage_seconds"]["network"] for c in per_case if c.get("stage_seconds")]
    return sum(values) / len(values) if values else None


def _finished(run_out: str) -> tuple:
    """(report rows, per-case records) of a finished benchmark run in ``run_out``; (None, None) otherwise."""
    run = os.path.join(run_out, RUN_FILE)
    if not os.path.isfile(run):
        return None, None
    with open(run) as f:
        if not json.load(f).get("finished"):
            return None, None
    with open(os.path.join(run_out, "results.json")) as f:
        rows = json.load(f)["rows"]
    with open(os.path.join(run_out, "per_case.json")) as f:
        return rows, json.load(f)["cases"]


def main(argv=None) -> int:
    from nnunet_moe.benchmark.command import benchmark
    from nnunet_moe.benchmark.report import summary_rows

    parser = argparse.ArgumentParser(prog="python -m nnunet_moe.benchmark.nmsw_trained",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="nnunet_moe_nmsw_trained", help="work folder (nnU-Net folders, results)")
    parser.add_argument("--shared", default=None, help="folder holding btcv/ (default: ../shared/data from here)")
    parser.add_argument("--demo", action="store_true", help="the bundled hippocampus data instead (tests)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--iters", type=int, default=ITERS)
    parser.add_argument("--k", type=int, nargs="+", default=list(KS), help="NMSW patches per volume (default 5 30)")
    parser.add_argument("--variants", nargs="*", default=[],
                        help="NMSW option variants also trained and run at each K (e.g. nnUNetTrainerNMSWScaledST)")
    parser.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    variants = check_variants(args.variants)
    out = os.path.abspath(args.out)
    set_default_paths(out)
    if args.demo:
        from nnunet_moe.demo_dataset import write_demo_dataset

        folder = write_demo_dataset(DEMO_ID, "NMSWDemo", num_test=2, num_train=6).folder
        dataset_id, planner_args = DEMO_ID, ()
    else:
        shared = args.shared or find_shared_data()
        if shared is None:
            raise SystemExit("nmsw_trained: no ../shared/data with btcv/ found; pass --shared FOLDER (or --demo)")
        folder = write_shared_dataset(shared, "btcv", BTCV_ID, num_test=6)
        dataset_id, planner_args = BTCV_ID, PLANNER_ARGS
    name = os.path.basename(folder)
    plans_file = ensure_plans(dataset_id, name, "3d_fullres", plans=PLANS, planner_args=planner_args)
    env = training_env(args.device, nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "0"))
    names = trainers(args.epochs, args.iters, variants)
    for trainer in names.values():
        train_or_reuse(dataset_id, name, trainer, "3d_fullres", 0, args.device, env=env, plans=PLANS)
    common = dict(images=os.path.join(folder, "imagesTs"), labels=os.path.join(folder, "labelsTs"), plans=PLANS,
                  device=args.device, tta=False, progress=False)
    summaries, class_rows = [], []
    for label, trainer, mode, k in benchmark_runs(names, args.k, variants):
        run_out = os.path.join(out, "benchmark", label.replace(" ", "_").replace("=", "").replace(",", ""))
        rows, per_case = _finished(run_out)
        if rows is None:  # not run yet, or interrupted: the benchmark's journal continues it
            run = os.path.join(run_out, RUN_FILE)
            result = benchmark(str(dataset_id), "3d_fullres", [trainer], 0, out=run_out, modes=[mode], nmsw_k=k,
                               resume=os.path.isfile(run), **common)
            rows, per_case = result.rows, result.per_case
        summaries += [{**s, "label": label, "k": k, "network_seconds_per_case": network_seconds(per_case)}
                      for s in summary_rows(rows)]
        class_rows += [dict(r, run=label) for r in rows]  # "label" stays the class label
    with open(plans_file) as f:
        patch = json.load(f)["configurations"]["3d_fullres"]["patch_size"]
    pre = os.path.join(os.environ["nnUNet_preprocessed"], name, f"{PLANS}_3d_fullres")
    cells = {c["case"]: grid_cells(c["preprocessed_shape"][1:], patch) for c in per_case}
    text = table(summaries, class_rows, cells)
    write_json_atomic(os.path.join(out, "nmsw_trained.json"),
                      {"plans": PLANS, "patch_size": patch, "preprocessed": pre, "cells": cells, "summaries": summaries,
                       "per_class": class_rows})
    with open(os.path.join(out, "nmsw_trained.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
