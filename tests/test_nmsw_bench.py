"""The NMSW-vs-sliding-window benchmark command, self-contained mode on one bundled hippocampus case."""
import os
import re

import pytest

from nnunet_moe.benchmark import nmsw_bench

BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nnunet_moe", "data",
                       "hippocampus")


def _row(output: str, prefix: str) -> list:
    line = next(line for line in output.splitlines() if line.startswith(prefix))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_self_contained_table_on_bundled_case(capsys, monkeypatch):
    monkeypatch.delenv("NNUNET_MOE_NMSW_K", raising=False)
    assert nmsw_bench.main(["--images", os.path.join(BUNDLED, "images"), "--labels", os.path.join(BUNDLED, "labels"),
                            "--num-cases", "1", "-k", "3", "--no-memory"]) == 0
    out = capsys.readouterr().out
    nmsw = _row(out, "| NMSW (global + top-K, K=3)")
    window = _row(out, "| nnU-Net sliding window")
    # a hippocampus volume fits in one patch: the patch grid has one cell, so K=3 is clamped to 1 and the
    # sliding window also runs one patch; NMSW adds the global pass, so it costs more FLOPs here
    assert float(nmsw[1]) == 1.0 and float(window[1]) == 1.0
    assert float(nmsw[3]) > float(window[3]) > 0
    assert nmsw[4] == window[4] == "not measured" and nmsw[5] == window[5] == "n/a"
    assert re.search(r"Speed-up [0-9.]+x", out) and "untrained (seeded)" in out
    # the benchmark restores the K variable it set for the NMSW mode
    assert "NNUNET_MOE_NMSW_K" not in os.environ


def test_bad_k_is_refused(capsys):
    with pytest.raises(SystemExit):
        nmsw_bench.main(["-k", "0"])
    assert "-k must be >= 1" in capsys.readouterr().err
