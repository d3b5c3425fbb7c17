"""markdown_tables / write_reports on synthetic result rows."""
import csv
import json
import math

import pytest

from nnunet_moe.benchmark.metrics import aggregate
from nnunet_moe.benchmark.report import markdown_tables, rows_from_aggregate, summary_rows, write_reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_rows():
    cost_a = {"params": 5_612_345, "flops": 12_300_000_000, "seconds_per_case": 1.25, "peak_memory_mb": 812.5}
    cost_b = {"params": 31_000_000, "flops": 98_700_000_000, "seconds_per_case": 4.5, "peak_memory_mb": 2048.0}
    return [
        {"model": "nnUNetTrainer", "mode": "3d_fullres", "label": 1, "class_name": "anterior",
         "dice": 0.9, "hd95": 2.0, "nsd": 0.95, **cost_a},
        {"model": "nnUNetTrainer", "mode": "3d_fullres", "label": 2, "class_name": "posterior",
         "dice": 0.8, "hd95": 3.0, "nsd": 0.85, **cost_a},
        # 'trainer' is accepted as the model key; NaN HD95 and a missing NSD must render as n/a
        {"trainer": "nnUNetTrainerSwinSMT", "mode": "3d_fullres", "label": 1, "class_name": "anterior",
         "dice": 0.7, "hd95": float("nan"), "nsd": None, **cost_b},
        {"trainer": "nnUNetTrainerSwinSMT", "mode": "3d_fullres", "label": 2, "class_name": "posterior",
         "dice": 0.6, "hd95": float("nan"), "nsd": None, **cost_b},
    ]


def test_summary_rows_foreground_means_and_costs():
    summaries = summary_rows(synthetic_rows())
    assert [(s["model"], s["mode"]) for s in summaries] == [("nnUNetTrainer", "3d_fullres"),
                                                           ("nnUNetTrainerSwinSMT", "3d_fullres")]
    assert summaries[0]["dice"] == pytest.approx(0.85)
    assert summaries[0]["hd95"] == pytest.approx(2.5)
    assert summaries[0]["params"] == 5_612_345
    assert summaries[1]["dice"] == pytest.approx(0.65)
    assert summaries[1]["hd95"] is None and summaries[1]["hd95_missing_classes"] == 2


def test_background_row_is_left_out_of_the_foreground_mean():
    rows = synthetic_rows()[:2] + [{**synthetic_rows()[0], "label": 0, "class_name": "background", "dice": 0.99}]
    assert summary_rows(rows)[0]["dice"] == pytest.approx(0.85)


def test_markdown_contains_models_formatted_means_and_na():
    text = markdown_tables(synthetic_rows())
    assert "nnUNetTrainer" in text and "nnUNetTrainerSwinSMT" in text
    summary_lines = [line for line in text.splitlines() if line.startswith("| nnUNetTrainer")]
    first = next(line for line in summary_lines if line.startswith("| nnUNetTrainer |"))
    second = next(line for line in summary_lines if line.startswith("| nnUNetTrainerSwinSMT |"))
    assert "| 0.8500 | 2.50 | 0.9000 | 5.61 | 12.30 | 1.250 | 812.5 |" in first
    assert "| 0.6500 | n/a | n/a | 31.00 | 98.70 | 4.500 | 2048.0 |" in second
    # per-class table: one line per input row
    assert "| nnUNetTrainerSwinSMT | 3d_fullres | 2 | posterior | 0.6000 | n/a | n/a |" in text
    assert "nan" not in text.lower().replace("n/a", "")


def test_write_reports_produces_all_four_files_and_round_trips(tmp_path):
    paths = write_reports(synthetic_rows(), str(tmp_path / "out"), "Hippocampus demo")
    assert set(paths) == {"markdown", "csv", "json", "png"}
    with open(paths["markdown"]) as f:
        markdown = f.read()
    assert markdown.startswith("# Hippocampus demo") and "0.8500" in markdown

    with open(paths["csv"], newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 4
    assert csv_rows[0]["model"] == "nnUNetTrainer" and int(csv_rows[0]["label"]) == 1
    assert float(csv_rows[0]["dice"]) == 0.9 and float(csv_rows[1]["hd95"]) == 3.0
    assert int(csv_rows[2]["params"]) == 31_000_000 and int(csv_rows[2]["flops"]) == 98_700_000_000
    assert float(csv_rows[2]["seconds_per_case"]) == 4.5 and float(csv_rows[0]["peak_memory_mb"]) == 812.5
    assert csv_rows[2]["hd95"] == "" and csv_rows[2]["nsd"] == ""

    with open(paths["json"]) as f:
        data = json.load(f)  # strict JSON: no NaN tokens
    assert data["title"] == "Hippocampus demo"
    assert data["rows"][1]["nsd"] == 0.85 and data["rows"][2]["model"] == "nnUNetTrainerSwinSMT"
    assert data["rows"][2]["hd95"] is None
    assert data["summary"][0]["dice"] == pytest.approx(0.85)
    assert data["summary"][1]["flops"] == 98_700_000_000

    with open(paths["png"], "rb") as f:
        png = f.read()
    assert png[:8] == PNG_MAGIC and len(png) > 1000


def test_plot_survives_models_without_time_or_dice(tmp_path):
    rows = synthetic_rows()
    for row in rows[2:]:
        row["seconds_per_case"] = None
    paths = write_reports(rows, str(tmp_path), "partial")
    with open(paths["png"], "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_rows_from_aggregate_feed_the_report():
    aggregated = aggregate([{1: {"dice": 0.5, "hd95": 1.0, "nsd": 0.5}, 2: {"dice": 1.0, "hd95": math.nan, "nsd": 1.0}}])
    rows = rows_from_aggregate("m", "2d", aggregated, {1: "liver"}, params=10, flops=20, seconds_per_case=0.5,
                               peak_memory_mb=1.0)
    assert [r["class_name"] for r in rows] == ["liver", "2"]
    assert summary_rows(rows)[0]["dice"] == pytest.approx(0.75)
    assert "| m | 2d | 2 | 2 | 1.0000 | n/a | 1.0000 |" in markdown_tables(rows)


def test_bad_rows_raise_clear_errors():
    with pytest.raises(ValueError, match="empty list"):
        markdown_tables([])
    with pytest.raises(ValueError, match="no 'model'"):
        markdown_tables([{"label": 1, "dice": 0.5}])
    with pytest.raises(ValueError, match="dice='high' is not a number"):
        markdown_tables([{"model": "m", "label": 1, "dice": "high"}])
    rows = synthetic_rows()[:2]
    rows[1]["params"] = 1
    with pytest.raises(ValueError, match="different params"):
        summary_rows(rows)


def _summary(model, mode, dice, seconds):
    return {"model": model, "mode": mode, "dice": dice, "seconds_per_case": seconds}


def test_dice_vs_time_figure_reads_at_a_glance():
    from nnunet_moe.benchmark.report import dice_vs_time_figure

    title = "Dataset501_Hippocampus 3d_fullres fold 0: 10 cases (demo held-out cases (imagesTs)), cpu, TTA on, " \
            "a title long enough to need wrapping"
    summaries = [_summary("nnUNetTrainerNMSW", "nmsw", 0.8, 2.0), _summary("nnUNetTrainerNMSW", "sliding_window",
                 0.82, 25.0), _summary("nnUNetTrainer", "sliding_window", 0.9, 30.0),
                 _summary("nnUNetTrainerSwinSMT", "sliding_window", None, 40.0)]
    figure = dice_vs_time_figure(summaries, title)
    axes = figure.axes[0]
    assert axes.get_ylim() == (0.0, 1.0)
    assert axes.get_xscale() == "log"  # 30 s / 2 s > 10
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == ["nnUNetTrainerNMSW (nmsw)", "nnUNetTrainerNMSW (sliding_window)",
                      "nnUNetTrainer (sliding_window)"]  # one per (model, mode) with Dice and time
    markers = {(line.get_marker(), line.get_color()) for line in axes.get_lines()}
    assert len(markers) == 3 and all(len(line.get_xdata()) == 1 for line in axes.get_lines())
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)
    box = figure.bbox
    for artist in (figure._suptitle, figure.legends[0], axes.xaxis.label, axes.yaxis.label):
        extent = artist.get_window_extent(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, artist
    assert "1 model(s) without Dice or time not shown" in figure._suptitle.get_text().replace("\n", " ")

    # Real trainer names are long (short-schedule suffixes): the legend must still fit.
    long_names = [_summary("nnUNetTrainerAdam1en3_3epochs_30iters_bs8", "sliding_window", 0.48, 38.0),
                  _summary("nnUNetTrainerMoESAMSmall_3epochs_30iters_bs8", "sliding_window", 0.25, 18.0)]
    figure = dice_vs_time_figure(long_names, "short title")
    figure.draw(figure.canvas.get_renderer())
    extent = figure.legends[0].get_window_extent(figure.canvas.get_renderer())
    assert figure.bbox.x0 <= extent.x0 and extent.x1 <= figure.bbox.x1

    close = dice_vs_time_figure([_summary("a", "m", 0.5, 2.0), _summary("b", "m", 0.6, 20.0)], "ten times")
    assert close.axes[0].get_xscale() == "linear" and close.axes[0].get_ylim() == (0.0, 1.0)  # 20 / 2 is not > 10
