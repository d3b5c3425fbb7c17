"""M4oE against nnU-Net on BTCV (CT) + CHAOS T2 (MR), one budget for every run (a long benchmark).

``python -m nnunet_moe.benchmark.m4oe_table --out DIR [--shared ../shared/data]`` writes the two development
sets of ``../shared/data`` as nnU-Net raw datasets (``shared_data``, resampled in-plane to ``SPACING`` so the
runs fit a CPU; BTCV: 18 training + 6 held-out cases, CHAOS: 12 + 4), merges them with ``nnunet-moe
merge-datasets`` (liver, kidneys and spleen matched by name; CHAOS does not annotate the other nine BTCV
organs), plans ``2d`` for all three with the stock planner and trains, with the stock ``nnUNetv2_train`` on
fold 0, for the same number of iterations and batch size. BTCV and CHAOS alone get the merge's folds (its
``splits_final.json`` without the ``d602_``/``d603_`` case prefixes) as their own ``splits_final.json``, so
every model trains and validates on the same cases:

- nnU-Net (``nnUNetTrainerAdam1en3``: its U-Net with Adam 1e-3; nnU-Net's SGD 1e-2 scored a Dice of 0.000
  on BTCV after this budget) on BTCV alone, on CHAOS alone and on the merge (where an
  unannotated organ of a CHAOS case counts as background: the naive baseline M4oE's loss avoids);
- M4oE (CPU size, ``nnUNetTrainerM4oESmall``, lr 1e-3 for the short budget) on the merge, partial labels
  "marginal" (default) and "select" (``nnUNetTrainerM4oESelectSmall``);
- M4oE "marginal" fine-tuned from stage-1 MAE weights (``nnUNetTrainerM4oEPretrainSmall``, same budget),
  in its own results folder.

Every model predicts the held-out cases of the sets it was trained on (stock ``nnUNetv2_predict
--disable_tta``: mirroring would quadruple the CPU time of every row alike), nnU-Net
evaluates them (``summary.json``) and the merged models' Dice is sorted by source, each case on its own
source's labels (``datasets.evaluation``). The table: mean Dice over BTCV's 13 organs and over CHAOS's 4,
the liver of each, training time (the sum of the epochs nnU-Net logged in ``checkpoint_final.pth``; the MAE row
adds its stage-1 pretraining) and seconds per iteration (median epoch time, which includes the epoch's
validation iterations, / training iterations).

Interrupt at any time: finished steps are reused (``stock_pipeline``), an interrupted training continues
with ``--c``; every finished row is merged into ``m4oe_table.json`` by its label (a row of an earlier
``--only`` invocation stays, the same label measured again replaces it) and the table lists the file's rows.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

from nnunet_moe.benchmark.journal import write_json_atomic
from nnunet_moe.benchmark.shared_data import find_shared_data, write_shared_dataset
from nnunet_moe.datasets.metadata import merge_metadata
from nnunet_moe.datasets.evaluation import case_dice_from_nnunet_summary, per_source_dice
from nnunet_moe.nnunet_paths import set_default_paths
from nnunet_moe.stock_pipeline import (ensure_plans, epoch_seconds, evaluate_folder, predict_folder, train_or_reuse,
                                       training_env, training_log)

SPACING = (2.0, 2.0, None)  # mm, x y z; z kept (2d): about 1/2 of BTCV's and 2/3 of CHAOS's in-plane resolution
BTCV_ID, CHAOS_ID, MERGED_ID = 602, 603, 611
MERGED_NAME = "BTCVChaos"
# 200 iterations of 8 slices: what fits a session on 2 CPU cores (a 2d nnU-Net iteration at 2 mm, 160 x 192
# patches, takes about 3 s there with its validation share; 1000 iterations would take 7 x 50 min)
EPOCHS, ITERS, BATCH = 10, 20, 8


def runs(epochs: int = EPOCHS, iters: int = ITERS, batch: int = BATCH) -> list:
    """``[(row label, dataset id, trainer, MAE pretraining trainer or None)]`` in run order."""
    budget = f"_{epochs}epochs_{iters}iters_bs{batch}"
    nnunet = "nnUNetTrainerAdam1en3" + budget
    m4oe = "nnUNetTrainerM4oESmall" + budget + "_lr1en3"
    return [("nnU-Net, BTCV alone", BTCV_ID, nnunet, None),
            ("nnU-Net, CHAOS alone", CHAOS_ID, nnunet, None),
            ("nnU-Net, merged", MERGED_ID, nnunet, None),
            ("M4oE marginal, merged", MERGED_ID, m4oe, None),
            ("M4oE select, merged", MERGED_ID, "nnUNetTrainerM4oESelectSmall" + budget + "_lr1en3", None),
            ("M4oE marginal + MAE, merged", MERGED_ID, m4oe, "nnUNetTrainerM4oEPretrainSmall" + budget)]


def prepare_datasets(shared: str, log=print) -> dict:
    """Raw BTCV, CHAOS and their merge (reused where they exist), planned for 2d, BTCV and CHAOS split like
    the merge (:func:`write_source_splits`): ``{id: raw folder}``."""
    from nnunet_moe.datasets.merge import merge_datasets

    folders = {BTCV_ID: write_shared_dataset(shared, "btcv", BTCV_ID, num_test=6, spacing=SPACING, log=log),
               CHAOS_ID: write_shared_dataset(shared, "chaos_t2", CHAOS_ID, num_test=4, spacing=SPACING, log=log)}
    merged = os.path.join(os.environ["nnUNet_raw"], f"Dataset{MERGED_ID:03d}_{MERGED_NAME}")
    folders[MERGED_ID] = merged if os.path.isdir(merged) else merge_datasets(
        MERGED_ID, [f"{BTCV_ID}:CT", f"{CHAOS_ID}:MR"], [], name=MERGED_NAME, log=log)
    for dataset_id, folder in folders.items():
        ensure_plans(dataset_id, os.path.basename(folder), "2d", log=log)
    write_source_splits(folders, log=log)
    return folders


def source_splits(merged_splits: list, meta: dict, source_dataset: str) -> list:
    """The merged dataset's folds restricted to the cases of one source (``Dataset602_BTCV``), named as in that
    source (the merge's ``d602_`` prefix removed, see ``datasets.merge``), in nnU-Net's ``splits_final.json`` format."""
    keys = [k for k, s in meta["sources"].items() if s["dataset"] == source_dataset]
    if len(keys) != 1:
        raise ValueError(f"{source_dataset} is not a source of the merged dataset (its sources: "
                         f"{', '.join(s['dataset'] for s in meta['sources'].values())}).")
    own = {c: c[len(keys[0]) + 1:] for c, r in meta["cases"].items() if r["source"] == keys[0]}
    return [{part: [own[c] for c in fold[part] if c in own] for part in ("train", "val")} for fold in merged_splits]


def _fold_sets(splits: list) -> list:
    return [{part: set(fold[part]) for part in ("train", "val")} for fold in splits]  # nnU-Net ignores the order


def write_source_splits(folders: dict, log=print) -> None:
    """BTCV's and CHAOS's ``splits_final.json`` in ``nnUNet_preprocessed``: the merged dataset's folds (its own
    preprocessed ``splits_final.json``, which its training reads) without the source prefixes. nnU-Net's trainer
    then uses them instead of its random split, so a source alone trains and validates on the cases the merged
    models do. An existing identical file is kept; a different one (e.g. nnU-Net's random split from an earlier
    run, with models trained on it) is refused, never overwritten."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    pre = os.environ["nnUNet_preprocessed"]
    merged = os.path.join(pre, os.path.basename(folders[MERGED_ID]))
    merged_file = os.path.join(merged, "splits_final.json")
    with open(merged_file) as f:
        merged_splits = json.load(f)
    with open(os.path.join(merged, "dataset.json")) as f:
        meta = merge_metadata(json.load(f), os.path.join(merged, "dataset.json"))
    for dataset_id in (BTCV_ID, CHAOS_ID):
        folder = folders[dataset_id]
        name = os.path.basename(folder)
        splits = source_splits(merged_splits, meta, name)
        with open(os.path.join(folder, "dataset.json")) as f:
            cases = set(get_filenames_of_train_images_and_targets(folder, json.load(f)))
        if set().union(*(fold["val"] for fold in splits)) != cases:  # each case is validated in one fold
            raise ValueError(f"The merged split {merged_file} does not cover exactly the training cases of {folder}: "
                             f"the merge was made from other versions of the sources. Delete "
                             f"{folders[MERGED_ID]} (and its nnUNet_preprocessed folder) and rerun to re-merge.")
        target = os.path.join(pre, name, "splits_final.json")
        if os.path.isfile(target):
            with open(target) as f:
                existing = json.load(f)
            if _fold_sets(existing) != _fold_sets(splits):
                raise FileExistsError(
                    f"{target} holds another split than the merged dataset's folds ({merged_file} without the "
                    f"source prefix), e.g. nnU-Net's random split from an earlier run, so {name} alone would not "
                    f"train on the cases the merged models do. Delete it and the models trained with it (the "
                    f"{name} folders under nnUNet_results*/) and rerun; it is then written from the merge.")
            log(f"Reusing {target}: the merged dataset's folds")
        else:
            write_json_atomic(target, splits)
            log(f"Wrote {target}: the merged dataset's folds of {name}")


def source_scores(summary: dict, dataset_json: dict, source_of: dict) -> dict:
    """``{"btcv" | "chaos": {"mean", "liver"}}`` from nnU-Net's ``summary.json`` of held-out predictions: a merged
    dataset's cases sorted by source (each on its own labels), a single dataset's on all its labels.
    ``source_of``: merge source key (``d602``) -> "btcv" / "chaos"; the dataset's own kind for a single one."""
    names = {int(v): n for n, v in dataset_json["labels"].items() if int(v) > 0}
    if "nnunet_moe_merge" in dataset_json:
        per_source = per_source_dice(case_dice_from_nnunet_summary(summary, dataset_json["file_ending"]),
                                     dataset_json)["sources"]
        return {source_of[k]: {"mean": s["mean_dice"], "liver": s["labels"].get("liver", {}).get("dice")}
                for k, s in per_source.items()}
    per_label = {names[int(k)]: float(v["Dice"]) for k, v in summary["mean"].items() if int(k) in names}
    finite = [v for v in per_label.values() if v == v]
    return {source_of["self"]: {"mean": sum(finite) / len(finite) if finite else None,
                                "liver": per_label.get("liver")}}


def run_one(label, dataset_id, trainer, pretrain, folders, out, iters, device, log=print) -> dict:
    """Train (MAE first where asked), predict the held-out cases, score them: one table row."""
    from nnunet_moe.pretrained.m4oe_mae_weights import WEIGHTS_ENV, WEIGHTS_NAME

    folder = folders[dataset_id]
    name = os.path.basename(folder)
    results = os.path.join(out, "nnUNet_results_mae" if pretrain else "nnUNet_results")
    env = training_env(device, nnUNet_results=results, nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "0"))
    env.pop(WEIGHTS_ENV, None)
    t0 = time.time()
    stage1_seconds = None
    if pretrain:
        stage1 = train_or_reuse(dataset_id, name, pretrain, "2d", 0, device, env=env, log=log)
        env[WEIGHTS_ENV] = os.path.join(stage1["output_folder"], WEIGHTS_NAME)
        stage1_seconds = sum(epoch_seconds(training_log(stage1["output_folder"])))  # its compute belongs to this row
    trained = train_or_reuse(dataset_id, name, trainer, "2d", 0, device, env=env, log=log)
    train_seconds = time.time() - t0
    epochs = epoch_seconds(training_log(trained["output_folder"]))
    pred = os.path.join(trained["output_folder"], "heldout_predictions")
    if not os.path.isfile(os.path.join(pred, "summary.json")):
        tmp = pred + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)  # only our own unfinished prediction
        predict_folder(os.path.join(folder, "imagesTs"), tmp, dataset_id, trainer, "2d", 0, device, tta=False,
                       env=env, log=log)
        pre = os.path.join(os.environ["nnUNet_preprocessed"], name)
        evaluate_folder(os.path.join(folder, "labelsTs"), tmp, os.path.join(pre, "nnUNetPlans.json"),
                        os.path.join(pre, "dataset.json"))
        os.rename(tmp, pred)
    with open(os.path.join(pred, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    kind = {BTCV_ID: "btcv", CHAOS_ID: "chaos"}
    source_of = {"self": kind.get(dataset_id), **{f"d{k:03d}": v for k, v in kind.items()}}
    return {"label": label, "dataset_id": dataset_id, "trainer": trainer, "mae": pretrain,
            "scores": source_scores(summary, dataset_json, source_of),
            "seconds_per_iteration": statistics.median(epochs) / iters,
            "train_seconds": sum(epochs) + (stage1_seconds or 0.0), "stage1_train_seconds": stage1_seconds,
            "wall_seconds_this_call": train_seconds if trained["ran"] else None}


def merge_rows(previous: list, row: dict) -> list:
    """``previous`` with ``row`` in place of the row of the same label (or added), in ``runs()`` order."""
    order = {label: i for i, (label, *_rest) in enumerate(runs())}
    by_label = {r["label"]: r for r in previous}
    by_label[row["label"]] = row
    return sorted(by_label.values(), key=lambda r: order.get(r["label"], len(order)))


def read_rows(path: str, planned: list) -> list:
    """The rows of an ``m4oe_table.json`` (empty if there is none yet), each of the budget of ``planned`` (the
    ``runs()`` of this invocation): one table never mixes budgets."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"label", "trainer"} <= set(r) for r in rows):
        raise SystemExit(f"{path}: not an m4oe_table row file (a JSON list of rows with label and trainer, as this "
                         "command writes); move it away or use another --out")
    trainer_of = {label: trainer for label, _id, trainer, _pretrain in planned}
    for r in rows:
        if trainer_of.get(r["label"]) != r["trainer"]:
            raise SystemExit(f"{path}: row {r['label']!r} was trained as {r['trainer']}, this invocation trains "
                             f"{trainer_of.get(r['label'])}: another budget; use another --out for it")
    return rows


def markdown(rows: list) -> str:
    def cell(row, source, key):
        value = row["scores"].get(source, {}).get(key)
        return "-" if value is None else f"{value:.3f}"

    def minutes(row):
        stage1 = row.get("stage1_train_seconds")
        return f"{row['train_seconds'] / 60:.1f}" + ("" if stage1 is None else f" ({stage1 / 60:.1f} + "
                                                     f"{(row['train_seconds'] - stage1) / 60:.1f})¹")

    head = ("| model | BTCV mean Dice (13) | BTCV liver | CHAOS mean Dice (4) | CHAOS liver | training time (min) | "
            "s / iteration (epoch incl. validation)² |\n|---|---:|---:|---:|---:|---:|---:|")
    body = [f"| {r['label']} | {cell(r, 'btcv', 'mean')} | {cell(r, 'btcv', 'liver')} | {cell(r, 'chaos', 'mean')} | "
            f"{cell(r, 'chaos', 'liver')} | {minutes(r)} | {r['seconds_per_iteration']:.2f} |" for r in rows]
    notes = ["", "Training time: the sum of the epochs nnU-Net logged in checkpoint_final.pth (without start-up "
                 "and final validation)."]
    if any(r.get("stage1_train_seconds") is not None for r in rows):
        notes.append("¹ total (stage-1 MAE pretraining + stage-2 training): the whole compute of the row.")
    notes.append("² median epoch time / training iterations (of stage 2 where there are two); an epoch also runs "
                 "its validation iterations and saves a checkpoint, so this is more than one training iteration.")
    return "\n".join([head] + body + notes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunet_moe.benchmark.m4oe_table",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="nnunet_moe_m4oe_table", help="work folder (nnU-Net folders, results)")
    parser.add_argument("--shared", default=None, help="the folder holding btcv/ and chaos_t2/ (default: found "
                                                       "as ../shared/data from here)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--iters", type=int, default=ITERS)
    parser.add_argument("--only", nargs="*", default=None, help="run only rows whose label contains one of these")
    parser.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    shared = args.shared or find_shared_data()
    if shared is None:
        raise SystemExit("m4oe_table: no ../shared/data with btcv/ and chaos_t2/ found; pass --shared FOLDER")
    out = os.path.abspath(args.out)
    set_default_paths(out)
    folders = prepare_datasets(shared)
    table_file = os.path.join(out, "m4oe_table.json")
    planned = runs(args.epochs, args.iters)
    rows = read_rows(table_file, planned)
    for label, dataset_id, trainer, pretrain in planned:
        if args.only and not any(s in label for s in args.only):
            continue
        rows = merge_rows(rows, run_one(label, dataset_id, trainer, pretrain, folders, out, args.iters, args.device))
        write_json_atomic(table_file, rows)
        print(markdown(rows), flush=True)
    with open(os.path.join(out, "m4oe_table.md"), "w") as f:
        f.write(markdown(rows) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
