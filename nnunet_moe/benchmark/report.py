"""Benchmark reports: Markdown tables, CSV, JSON and a Dice-versus-time plot.

Input is a list of result rows, one per (model, mode, class), as plain dicts:

=================  =====================================================================
key                meaning
=================  =====================================================================
model              model / trainer name (str, required; ``trainer`` is accepted instead)
mode               inference mode, e.g. "sliding_window" or "3d_fullres" (str, optional)
label              class label or region (int, str or tuple, required)
class_name         human-readable class name (str, optional)
dice, hd95, nsd    per-class means over cases (float; HD95 in mm; None/NaN = missing)
params             parameter count (int) -- per model, repeated on each of its rows
flops              FLOPs of one forward pass / case (int) -- per model
seconds_per_case   inference seconds per case (float) -- per model
peak_memory_mb     peak memory in MiB (float) -- per model
patches_per_case   samples through the patch network per case (float) -- per model
=================  =====================================================================

A model's summary row takes the foreground mean of each metric (mean over its classes,
ignoring missing values, label 0 left out as in nnU-Net) and the model-level cost columns.
Missing values are written "n/a" in Markdown, empty in CSV and ``null`` in JSON; they never
raise. ``rows_from_aggregate`` turns ``metrics.aggregate`` output into rows.
"""
from __future__ import annotations

import csv
import json
import math
import os
import textwrap
from collections.abc import Sequence

import numpy as np

METRIC_KEYS = ("dice", "hd95", "nsd")
COST_KEYS = ("params", "flops", "seconds_per_case", "peak_memory_mb", "patches_per_case")
COLUMNS = ("model", "mode", "label", "class_name", *METRIC_KEYS, *COST_KEYS)
NOT_AVAILABLE = "n/a"


def _number_or_none(value):
    """float/int value, or None for missing (None, NaN, empty string)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    number = float(value)
    return None if math.isnan(number) else number


def _normalise_rows(rows: Sequence[dict]) -> list[dict]:
    if len(rows) == 0:
        raise ValueError("no result rows to report; got an empty list")
    normalised = []
    for index, row in enumerate(rows):
        model = row.get("model", row.get("trainer"))
        if model is None or str(model) == "":
            raise ValueError(f"row {index} has no 'model' (or 'trainer') name: {row}")
        if "label" not in row:
            raise ValueError(f"row {index} ({model}) has no 'label': {row}")
        out = {"model": str(model), "mode": str(row.get("mode") or ""), "label": row["label"],
               "class_name": str(row.get("class_name") or row["label"])}
        for key in (*METRIC_KEYS, *COST_KEYS):
            try:
                out[key] = _number_or_none(row.get(key))
            except (TypeError, ValueError) as error:
                raise ValueError(f"row {index} ({model}): {key}={row.get(key)!r} is not a number") from error
        normalised.append(out)
    return normalised


def _model_keys(rows: list[dict]) -> list[tuple[str, str]]:
    keys = []
    for row in rows:
        if (row["model"], row["mode"]) not in keys:
            keys.append((row["model"], row["mode"]))
    return keys


def summary_rows(rows: Sequence[dict]) -> list[dict]:
    """One dict per (model, mode): foreground means of dice/hd95/nsd plus the cost columns.

    Raises ValueError when one model's rows give different values for a cost column.
    """
    rows = _normalise_rows(rows)
    summaries = []
    for model, mode in _model_keys(rows):
        own = [r for r in rows if r["model"] == model and r["mode"] == mode]
        foreground = [r for r in own if str(r["label"]) != "0"]
        summary = {"model": model, "mode": mode, "n_classes": len(foreground)}
        for key in METRIC_KEYS:
            values = [r[key] for r in foreground if r[key] is not None]
            summary[key] = sum(values) / len(values) if values else None
            summary[f"{key}_missing_classes"] = len(foreground) - len(values)
        for key in COST_KEYS:
            values = {r[key] for r in own if r[key] is not None}
            if len(values) > 1:
                raise ValueError(
                    f"model {model!r} mode {mode!r} has different {key} values on its rows: {sorted(values)}; "
                    "cost columns are per model and must be equal on all of its rows"
                )
            summary[key] = values.pop() if values else None
        summaries.append(summary)
    return summaries


def _fmt(value, digits: int) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.{digits}f}"


def _fmt_scaled(value, scale: float, digits: int) -> str:
    return NOT_AVAILABLE if value is None else f"{value / scale:.{digits}f}"


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def markdown_tables(rows: Sequence[dict]) -> str:
    """Two Markdown tables: one row per model/mode (foreground means and cost), then per class.

    Formats: Dice and NSD with 4 decimals, HD95 in mm with 2, parameters in millions (M),
    FLOPs in GFLOPs (2 FLOPs per multiply-accumulate), seconds with 3 decimals, memory in MiB
    and patches per case with 1; missing values as "n/a".
    """
    normalised = _normalise_rows(rows)
    summary_body = [
        [s["model"], s["mode"] or "-", _fmt(s["dice"], 4), _fmt(s["hd95"], 2), _fmt(s["nsd"], 4),
         _fmt_scaled(s["params"], 1e6, 2), _fmt_scaled(s["flops"], 1e9, 2), _fmt(s["seconds_per_case"], 3),
         _fmt(s["peak_memory_mb"], 1), _fmt(s["patches_per_case"], 1)]
        for s in summary_rows(normalised)
    ]
    summary = _markdown_table(
        ["Model", "Mode", "Mean Dice", "Mean HD95 (mm)", "Mean NSD", "Params (M)", "GFLOPs", "s / case",
         "Peak memory (MiB)", "Patches / case"],
        summary_body,
    )
    per_class_body = [
        [r["model"], r["mode"] or "-", str(r["label"]), r["class_name"], _fmt(r["dice"], 4), _fmt(r["hd95"], 2),
         _fmt(r["nsd"], 4)]
        for r in normalised
    ]
    per_class = _markdown_table(["Model", "Mode", "Label", "Class", "Dice", "HD95 (mm)", "NSD"], per_class_body)
    return "Foreground means (label 0 excluded):\n\n" + summary + "\n\nPer class:\n\n" + per_class + "\n"


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def dice_vs_time_figure(summaries: list[dict], title: str):
    """The Dice-versus-time figure of ``summary_rows`` output: one marker per (model, mode), with a legend.

    Colour per model, marker shape per mode; Dice axis fixed to 0..1 so that plots of different runs
    compare; a log time axis when the times differ by more than 10x (sliding window against top-K
    patches would squash a linear one). The title is wrapped to the figure's width and the legend
    sits below the axes, both inside the figure (constrained layout).
    """
    # Figure + Agg canvas directly: no global matplotlib backend switch inside a library
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plotted = [s for s in summaries if s["dice"] is not None and s["seconds_per_case"] is not None]
    models = list(dict.fromkeys(s["model"] for s in plotted))
    modes = list(dict.fromkeys(s["mode"] for s in plotted))
    figure = Figure(figsize=(7.2, 5.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for s in plotted:
        axes.plot([s["seconds_per_case"]], [s["dice"]], linestyle="none", markersize=9,
                  marker=MARKERS[modes.index(s["mode"]) % len(MARKERS)],
                  color=f"C{models.index(s['model']) % 10}",
                  label=s["model"] + (f" ({s['mode']})" if s["mode"] else ""))
    times = [s["seconds_per_case"] for s in plotted if s["seconds_per_case"] > 0]
    if times and max(times) / min(times) > 10:
        from matplotlib.ticker import FuncFormatter

        axes.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # "20", not "2 x 10^1"
        axes.xaxis.set_major_formatter(plain)
        axes.xaxis.set_minor_formatter(plain)
    axes.set_ylim(0, 1)
    axes.set_xlabel("seconds per case")
    axes.set_ylabel("mean foreground Dice")
    axes.grid(True, alpha=0.3)
    skipped = len(summaries) - len(plotted)
    full_title = title + (f" ({skipped} model(s) without Dice or time not shown)" if skipped else "")
    figure.suptitle(textwrap.fill(full_title, 80), fontsize=10)
    if plotted:
        # One entry per line: trainer names with short-schedule suffixes do not fit two to a row.
        figure.legend(loc="outside lower center", ncols=1, fontsize=8, frameon=False)
    return figure


def _json_value(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def write_reports(rows: Sequence[dict], out_dir: str, title: str) -> dict:
    """Write ``report.md``, ``results.csv``, ``results.json`` and ``dice_vs_time.png`` into ``out_dir``.

    The CSV has one line per input row with the columns ``COLUMNS`` (missing values empty);
    the JSON is ``{"title", "rows": [...], "summary": [...]}`` with missing values ``null``
    (``summary`` as returned by ``summary_rows``). Returns ``{"markdown", "csv", "json", "png"}``
    mapped to the file paths.
    """
    normalised = _normalise_rows(rows)
    summaries = summary_rows(normalised)
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, file) for name, file in
             (("markdown", "report.md"), ("csv", "results.csv"), ("json", "results.json"),
              ("png", "dice_vs_time.png"))}
    with open(paths["markdown"], "w") as f:
        f.write(f"# {title}\n\n" + markdown_tables(normalised))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in normalised:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in COLUMNS})
    with open(paths["json"], "w") as f:
        json.dump({"title": title, "rows": [{k: _json_value(row[k]) for k in COLUMNS} for row in normalised],
                   "summary": summaries}, f, indent=2, allow_nan=False, default=str)
    dice_vs_time_figure(summaries, title).savefig(paths["png"], format="png")
    return paths


def rows_from_aggregate(model: str, mode: str, aggregated: dict, class_names: dict | None = None,
                        params=None, flops=None, seconds_per_case=None, peak_memory_mb=None,
                        patches_per_case=None) -> list[dict]:
    """Report rows for one model from ``nnunet_moe.benchmark.metrics.aggregate`` output.

    ``class_names`` maps a label to its name (e.g. inverted from dataset.json's ``labels``).
    """
    class_names = class_names or {}
    return [
        {"model": model, "mode": mode, "label": label, "class_name": class_names.get(label, str(label)),
         **{key: means[key] for key in METRIC_KEYS}, "params": params, "flops": flops,
         "seconds_per_case": seconds_per_case, "peak_memory_mb": peak_memory_mb,
         "patches_per_case": patches_per_case}
        for label, means in aggregated["per_label"].items()
    ]


def memory_growth_rows(records: Sequence[dict]) -> list[dict]:
    """Resident memory over the cases of each (model, mode), from per-case records with ``rss_after_bytes``
    and ``rss_peak_bytes`` (``nnunet-moe benchmark --memory-growth``), in MiB and in record order.

    ``after_1``, ``after_2``, ``after_last``: the process's RSS after case 1, 2 and the last case;
    ``growth``: the highest RSS after any later case minus the RSS after case 2 (case 1 holds the warm-up
    and first-use caches; the allocator may hand memory back, so single values dip, but a leak raises
    the top); ``peak``: the largest RSS during any case. ``growth`` compares one process only: None when
    the records come from several (a resumed run), or from fewer than 2 cases. ``heap_growth``: the same
    for the C heap in use (``heap_after_bytes``, ``cost.heap_in_use_bytes``), which memory freed and kept
    by the allocator does not blur; None where it was not measured.
    """
    keys = list(dict.fromkeys((r["model"], r["mode"]) for r in records))
    out = []
    for model, mode in keys:
        own = [r for r in records if (r["model"], r["mode"]) == (model, mode)]
        if any(r.get("rss_after_bytes") is None for r in own):
            continue
        after = [r["rss_after_bytes"] / 2 ** 20 for r in own]
        one_process = len({r.get("session", 0) for r in own}) == 1
        out.append({"model": model, "mode": mode, "cases": len(own), "after_1": after[0],
                    "after_2": after[1] if len(after) > 1 else None, "after_last": after[-1],
                    "growth": max(after[1:]) - after[1] if one_process and len(after) > 1 else None,
                    "heap_growth": _heap_growth(own) if one_process else None,
                    "peak": max(r["rss_peak_bytes"] for r in own) / 2 ** 20})
    return out


def _heap_growth(own: list):
    heap = [r.get("heap_after_bytes") for r in own]
    return max(heap[1:]) / 2 ** 20 - heap[1] / 2 ** 20 if len(heap) > 1 and None not in heap else None


def memory_growth_table(records: Sequence[dict]) -> str:
    """``memory_growth_rows`` as a Markdown table (MiB, one decimal); empty string without RSS records."""
    rows = memory_growth_rows(records)
    if not rows:
        return ""
    body = [[r["model"], r["mode"], str(r["cases"])] + [_fmt(r[k], 1) for k in
                                                         ("after_1", "after_2", "after_last", "growth", "peak",
                                                          "heap_growth")]
            for r in rows]
    return _markdown_table(["Model", "Mode", "Cases", "RSS after case 1 (MiB)", "after case 2", "after last case",
                            "max growth after case 2", "peak RSS (MiB)", "heap in use: max growth after case 2"],
                           body)
