"""Same-budget convergence of every trainer on the bundled hippocampus data (a long benchmark).

``python -m nnunet_moe.benchmark.convergence --out DIR`` trains each run of the list (our trainers
and nnU-Net's, at the paper's learning rate and at one suited to the budget) with the stock
``nnUNetv2_train`` for the same number of iterations on the same fold-0 split of the demo dataset,
predicts the 10 held-out cases with the stock ``nnUNetv2_predict`` and prints one table:

- fold-0 Dice: nnU-Net's own final validation (``fold_0/validation/summary.json``);
- held-out Dice: nnU-Net's evaluation of the held-out predictions;
- s / iteration: median epoch wall time / training iterations per epoch (an epoch also runs
  nnU-Net's validation iterations, one fifth of the training iterations in short schedules);
- peak RSS: the largest process of the training command (``wait4``), for the part that ran in
  this invocation (a continued run reports the continued part).

The curve ``dice_vs_iterations.png`` plots nnU-Net's per-epoch pseudo Dice (``mean_fg_dice`` in
the checkpoint's log: Dice over the epoch's validation patches) against training iterations.

Interrupt it at any time: every step reuses finished work (``stock_pipeline``), an interrupted
training continues with ``--c``, and ``convergence.json`` is rewritten after every run, so running
the same command again continues where it stopped. ``--repeats N`` repeats every run N times
(unseeded, as nnU-Net trains) in separate results folders.

``--measured FILE`` keeps the finished rows beyond the work folder: a run already recorded there (same
configuration, trainer and repeat) is taken from it instead of trained again, and every new row is
added to it as soon as it is measured. The README's convergence table and plot come from the file
shipped as ``nnunet_moe/benchmark/measured/hippocampus_convergence.json`` (``--report-only`` redraws
them from it without training).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

from nnunet_moe.benchmark.journal import write_json_atomic
from nnunet_moe.demo_dataset import DEFAULT_DATASET_ID, DEFAULT_DATASET_NAME, write_demo_dataset
from nnunet_moe.nnunet_paths import set_default_paths
from nnunet_moe.stock_pipeline import (ensure_plans, epoch_seconds, evaluate_folder, predict_folder, train_or_reuse,
                                       training_env, training_log)
from nnunet_moe.trainer_names import format_lr, parse_short_name

EPOCHS, ITERS = 10, 30  # 300 training iterations, nnU-Net's validation and checkpoint after each epoch

# (configuration, trainer, batch size or None for the plans', learning rates: None = the trainer's own)
DEFAULT_RUNS = (
    ("3d_fullres", "nnUNetTrainer", None, (None,)),  # nnU-Net's default: SGD 1e-2, poly
    ("3d_fullres", "nnUNetTrainerAdam1en3", None, (None,)),
    ("3d_fullres", "nnUNetTrainerSwinSMTSmall", None, (None, 1e-3)),  # paper 1e-4
    ("3d_fullres", "nnUNetTrainerNMSW", None, (None, 1e-3)),  # paper 3e-4
    ("3d_fullres", "nnUNetTrainerNMSWSwinSMT", None, (None, 1e-3)),  # NMSW's 3e-4; local net: Swin SMT Small
    ("3d_fullres", "nnUNetTrainerSwinUMambaDScratch", None, (None, 1e-3)),  # paper 1e-4
    ("2d", "nnUNetTrainerAdam1en3", 8, (None,)),
    ("2d", "nnUNetTrainerSwinUMambaScratch", 8, (None, 1e-3)),  # paper 1e-4
    ("2d", "nnUNetTrainerMoESAMSmall", 8, (None, 1e-3)),  # ours 5e-4 (paper: pretrained SAM)
    ("2d", "nnUNetTrainerM4oESmall", 8, (None, 1e-3)),  # ours 1e-4 (not given in the paper); one expert here
)


def run_names(runs=DEFAULT_RUNS, epochs: int = EPOCHS, iters: int = ITERS) -> list:
    """``[(configuration, full short-schedule trainer name)]`` in run order."""
    out = []
    for configuration, base, batch, lrs in runs:
        for lr in lrs:
            name = f"{base}_{epochs}epochs_{iters}iters" + (f"_bs{batch}" if batch else "")
            out.append((configuration, name + (f"_lr{format_lr(lr)}" if lr is not None else "")))
    return out


def summarise_run(fold_dir: str, trainer: str, heldout: dict) -> dict:
    """One table row from a finished fold folder and its held-out evaluation."""
    log = training_log(fold_dir)
    iters = parse_short_name(trainer).iters
    with open(os.path.join(fold_dir, "validation", "summary.json")) as f:
        fold0 = json.load(f)["foreground_mean"]["Dice"]
    return {
        "fold0_dice": float(fold0),
        "heldout_dice": float(heldout["foreground_mean"]["Dice"]),
        "heldout_per_class": {k: float(v["Dice"]) for k, v in heldout["mean"].items()},
        "seconds_per_iteration": statistics.median(epoch_seconds(log)) / iters,
        "max_lr": max(float(x) for x in log["lrs"]),
        "pseudo_dice_per_epoch": [float(x) for x in log["mean_fg_dice"]],
        "iterations_per_epoch": iters,
    }


def run_one(dataset, configuration: str, trainer: str, results: str, device: str, log=print) -> dict:
    """Train (or reuse / continue), predict and evaluate one run with its results in ``results``."""
    env = training_env(device, nnUNet_results=results, nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "0"))
    t0 = time.time()
    trained = train_or_reuse(dataset.dataset_id, dataset.name, trainer, configuration, 0, device, env=env, log=log)
    fold_dir = trained["output_folder"]
    pred = os.path.join(fold_dir, "heldout_predictions")
    summary_file = os.path.join(pred, "summary.json")
    if not os.path.isfile(summary_file):
        tmp = pred + ".partial"  # a killed prediction leaves no half folder behind under the final name
        shutil.rmtree(tmp, ignore_errors=True)  # only our own unfinished prediction
        predict_folder(dataset.images_ts, tmp, dataset.dataset_id, trainer, configuration, 0, device, env=env,
                       log=log)
        pre = os.path.join(os.environ["nnUNet_preprocessed"], dataset.name)
        evaluate_folder(dataset.labels_ts, tmp, os.path.join(pre, "nnUNetPlans.json"),
                        os.path.join(pre, "dataset.json"))
        os.rename(tmp, pred)
    with open(summary_file) as f:
        heldout = json.load(f)
    row = summarise_run(fold_dir, trainer, heldout)
    row.update(configuration=configuration, trainer=trainer, fold_dir=fold_dir,
               peak_rss_mib=None if trained["peak_rss_bytes"] is None else trained["peak_rss_bytes"] / 2 ** 20,
               wall_seconds_this_call=time.time() - t0)
    return row


def markdown(rows: list) -> str:
    head = ("| configuration | trainer | lr | repeat | fold-0 Dice | held-out Dice | s / iteration | peak RSS MiB |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|")
    body = []
    for r in rows:
        rss = "n/a" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:,.0f}"
        body.append(f"| {r['configuration']} | `{r['trainer']}` | {r['max_lr']:g} | {r['repeat']} | "
                    f"{r['fold0_dice']:.3f} | {r['heldout_dice']:.3f} | {r['seconds_per_iteration']:.2f} | {rss} |")
    return "\n".join([head] + body)


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in rows:
        its = [(i + 1) * r["iterations_per_epoch"] for i in range(len(r["pseudo_dice_per_epoch"]))]
        ax.plot(its, r["pseudo_dice_per_epoch"], marker=".", label=f"{r['trainer']} ({r['configuration']}, "
                                                                     f"repeat {r['repeat']})")
    ax.set_ylim(0, 1)
    ax.set_xlabel("training iterations")
    ax.set_ylabel("nnU-Net pseudo Dice (validation patches)")
    ax.set_title("Hippocampus, fold 0: pseudo Dice per epoch", loc="left", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _row_key(row: dict) -> tuple:
    return row["configuration"], row["trainer"], int(row["repeat"])


def read_measured(path) -> dict:
    """``{(configuration, trainer, repeat): row}`` from a ``--measured`` file (empty if it does not exist)."""
    if not path or not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"configuration", "trainer", "repeat"} <= set(r)
                                             for r in rows):
        raise SystemExit(f"{path}: not a convergence row file (a JSON list of rows with configuration, trainer and "
                         "repeat, as this command writes); point --measured at such a file or at a new path")
    return {_row_key(r): r for r in rows}


def machine() -> dict:
    """Where a row was measured: its numbers compare only with rows from the same kind of machine."""
    import platform

    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "processor": platform.processor() or platform.machine()}


def write_report(rows: list, out: str) -> None:
    with open(os.path.join(out, "convergence.md"), "w") as f:
        f.write(markdown(rows) + "\n")
    plot(rows, os.path.join(out, "dice_vs_iterations.png"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunet_moe.benchmark.convergence", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="nnunet_moe_convergence", help="work folder (nnU-Net folders, results)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None, help="run only trainers whose full name contains one of these")
    parser.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--measured", default=None,
                        help="JSON row file kept beyond --out: runs recorded there are not trained again, new rows are added")
    parser.add_argument("--report-only", action="store_true",
                        help="write the table and plot of the --measured rows into --out without training")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    measured = read_measured(args.measured)
    if args.report_only:
        if not measured:
            raise SystemExit("--report-only needs --measured pointing at an existing row file")
        os.makedirs(out, exist_ok=True)
        write_report(list(measured.values()), out)
        print(markdown(list(measured.values())))
        return 0
    set_default_paths(out)
    ds = write_demo_dataset(DEFAULT_DATASET_ID, DEFAULT_DATASET_NAME)
    runs = [r for r in run_names() if not args.only or any(s in r[1] for s in args.only)]
    for configuration in dict.fromkeys(c for c, _ in runs):
        ensure_plans(ds.dataset_id, ds.name, configuration)
    json_path = os.path.join(out, "convergence.json")
    rows = []
    for repeat in range(args.repeats):
        for configuration, trainer in runs:
            key = (configuration, trainer, repeat)
            if key in measured:
                rows.append(measured[key])
                continue
            results = os.path.join(out, f"repeat_{repeat}", "nnUNet_results")
            row = run_one(ds, configuration, trainer, results, args.device)
            row.update(repeat=repeat, machine=machine())
            rows.append(row)
            write_json_atomic(json_path, rows)
            if args.measured:
                measured[key] = row
                write_json_atomic(args.measured, list(measured.values()))
            print(markdown(rows), flush=True)
    write_report(rows, out)
    print(markdown(rows))
    print(f"Results: {json_path}, {os.path.join(out, 'convergence.md')}, {os.path.join(out, 'dice_vs_iterations.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
