"""The trained NMSW comparison (``python -m nnunet_moe.benchmark.nmsw_trained``) end to end on a tiny bundled case."""
from __future__ import annotations

import json
import os

import pytest

from nnunet_moe.benchmark import nmsw_trained


def test_grid_cells_follow_nnunets_sliding_window_steps():
    assert nmsw_trained.grid_cells((40, 56, 40), (40, 56, 40)) == 1
    assert nmsw_trained.grid_cells((30, 56, 40), (40, 56, 40)) == 1  # smaller than the patch: padded
    assert nmsw_trained.grid_cells((120, 120, 180), (48, 48, 48)) == 4 * 4 * 7  # step 24 per axis


def test_table_takes_each_runs_own_organ_dice():
    """Two NMSW runs share model and mode (only K differs): each row shows its own per-organ Dice."""
    def run_rows(run, liver):
        return [{"run": run, "model": "nnUNetTrainerNMSW", "mode": "nmsw", "label": 1, "class_name": "liver",
                 "dice": liver}]
    summary = dict(model="nnUNetTrainerNMSW", mode="nmsw", dice=0.5, seconds_per_case=4.0,
                   network_seconds_per_case=1.0, patches_per_case=5.0, flops=2e9, peak_memory_mb=100.0)
    text = nmsw_trained.table([dict(summary, label="NMSW K=5"), dict(summary, label="NMSW K=30")],
                              run_rows("NMSW K=5", 0.5) + run_rows("NMSW K=30", 0.8), {"case_0": 64})
    lines = text.splitlines()
    assert lines[2] == "| NMSW K=5 | nmsw | 0.500 | 0.500 | 4.00 | 1.00 | 5.0 | 2 | 100 |"
    assert lines[3].startswith("| NMSW K=30 | nmsw | 0.500 | 0.800 |")
    assert nmsw_trained.network_seconds([{"stage_seconds": {"network": 1.0}}, {"stage_seconds": {"network": 3.0}}]) == 2.0


def test_option_variants_train_with_the_same_budget_and_run_at_every_k():
    names = nmsw_trained.trainers(20, 20, ["nnUNetTrainerNMSWScaledST"])
    assert names == {"nmsw": "nnUNetTrainerNMSW_20epochs_20iters_lr1en3",
                     "nnunet": "nnUNetTrainerAdam1en3_20epochs_20iters",
                     "nnUNetTrainerNMSWScaledST": "nnUNetTrainerNMSWScaledST_20epochs_20iters_lr1en3"}
    runs = nmsw_trained.benchmark_runs(names, [5, 30], ["nnUNetTrainerNMSWScaledST"])
    assert [(label, mode, k) for label, _, mode, k in runs] == [
        ("NMSW K=5", "nmsw", 5), ("NMSW K=30", "nmsw", 30), ("NMSW local net, sliding window", "sliding_window", None),
        ("nnU-Net U-Net", "sliding_window", None), ("NMSWScaledST K=5", "nmsw", 5), ("NMSWScaledST K=30", "nmsw", 30)]
    assert runs[-1][1] == names["nnUNetTrainerNMSWScaledST"] and runs[2][1] == names["nmsw"]
    assert nmsw_trained.check_variants(["nnUNetTrainerNMSWDetachGlobal"] * 2) == ["nnUNetTrainerNMSWDetachGlobal"]
    for wrong in ("nnUNetTrainerNMSW", "nnUNetTrainerSwinSMT", "ScaledST"):  # the default itself, not NMSW, a typo
        with pytest.raises(SystemExit, match=f"--variants {wrong}: not an NMSW variant of ours; use any of "
                                             "nnUNetTrainerNMSWSwinSMT, nnUNetTrainerNMSWLogitsObjectness"):
            nmsw_trained.check_variants([wrong])


def test_each_option_variant_sets_only_its_option():
    from nnunet_moe.training import nmsw_trainer as t

    options = ("objectness_from", "straight_through", "detach_global_in_aggregation")
    default = {o: getattr(t.nnUNetTrainerNMSW, o) for o in options}
    assert default == {"objectness_from": "auto", "straight_through": "standard", "detach_global_in_aggregation": False}
    for cls, changed in ((t.nnUNetTrainerNMSWLogitsObjectness, {"objectness_from": "logits"}),
                         (t.nnUNetTrainerNMSWScaledST, {"straight_through": "scaled"}),
                         (t.nnUNetTrainerNMSWDetachGlobal, {"detach_global_in_aggregation": True})):
        assert {o: getattr(cls, o) for o in options} == {**default, **changed}
        assert set(vars(cls)) - {"__module__", "__doc__", "paper", "__qualname__", "__firstlineno__",
                                 "__static_attributes__"} == set(changed)


@pytest.mark.e2e
def test_trained_comparison_on_the_bundled_data(tmp_path, monkeypatch):
    """Plan (named plans), train NMSW and nnU-Net for the same budget, benchmark K=1, K=3, NMSW's local
    network under the sliding window and nnU-Net: one table whose figures agree with the benchmark runs."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
        os.makedirs(tmp_path / var)
    monkeypatch.setenv("nnUNet_compile", "f")
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    out = tmp_path / "work"
    assert nmsw_trained.main(["--out", str(out), "--demo", "--epochs", "1", "--iters", "2", "--k", "1", "3"]) == 0
    result = json.load(open(out / "nmsw_trained.json"))
    rows = {s["label"]: s for s in result["summaries"]}
    assert list(rows) == ["NMSW K=1", "NMSW K=3", "NMSW local net, sliding window", "nnU-Net U-Net"]
    cells = list(result["cells"].values())
    assert len(cells) == 2 and all(1 <= c <= 4 for c in cells)  # hippocampus: one or two patches per volume
    # without mirroring the sliding window runs one patch per grid cell; NMSW at most K of them (fewer where the
    # global network sees no foreground)
    for label in ("NMSW local net, sliding window", "nnU-Net U-Net"):
        assert rows[label]["patches_per_case"] == pytest.approx(sum(cells) / len(cells))
    assert rows["NMSW K=1"]["patches_per_case"] <= 1
    assert rows["NMSW K=1"]["patches_per_case"] <= rows["NMSW K=3"]["patches_per_case"] <= sum(cells) / len(cells)
    assert all(s["flops"] > 0 and s["seconds_per_case"] > 0 and s["dice"] is not None for s in rows.values())
    assert all(0 < s["network_seconds_per_case"] < s["seconds_per_case"] for s in rows.values())
    assert all(isinstance(r["label"], int) for r in result["per_class"])  # the class label, not the run
    table = open(out / "nmsw_trained.md").read().splitlines()
    assert table[0].startswith("| model | mode | mean Dice |") and len([l for l in table if l.startswith("| NMSW")]) == 3
    assert f"| NMSW K=1 | nmsw | {rows['NMSW K=1']['dice']:.3f} |" in table[2]
    # a second call reuses the trainings and the finished benchmark runs
    assert nmsw_trained.main(["--out", str(out), "--demo", "--epochs", "1", "--iters", "2", "--k", "1", "3"]) == 0
    assert sorted(os.listdir(out / "benchmark")) == sorted(
        ["NMSW_K1", "NMSW_K3", "NMSW_local_net_sliding_window", "nnU-Net_U-Net"])
