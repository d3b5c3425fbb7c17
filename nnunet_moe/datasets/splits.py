"""Five cross-validation folds stratified by source, in nnU-Net's ``splits_final.json`` format.

Each source's cases are sorted, shuffled with a fixed seed and dealt round-robin over the folds; the deal
continues where the previous source's ended, so folds stay balanced also when a source has fewer than
five cases. The merge writes the result as ``splits_final.json`` into the merged raw dataset folder:
nnU-Net 2.8's planner copies that file into ``nnUNet_preprocessed/<dataset>/`` (``ExperimentPlanner``,
``_maybe_copy_splits_file``), where ``nnUNetv2_train`` uses it instead of its own random split.
"""
from __future__ import annotations

import numpy as np

NUM_FOLDS = 5
SEED = 12345  # nnU-Net's generate_crossval_split seed


def stratified_splits(cases_by_source: dict, num_folds: int = NUM_FOLDS, seed: int = SEED) -> list:
    """``{source: [case ids]}`` (in source order) -> ``[{"train": [...], "val": [...]}] * num_folds``."""
    total = sum(len(v) for v in cases_by_source.values())
    if total < num_folds:
        raise ValueError(f"The merged dataset would have {total} training cases; nnU-Net's {num_folds}-fold "
                         f"cross-validation needs at least {num_folds}. Add sources or cases.")
    val = [[] for _ in range(num_folds)]
    start = 0
    for cases in cases_by_source.values():
        order = np.random.RandomState(seed).permutation(len(cases))
        ordered = sorted(cases)
        for i, j in enumerate(order):
            val[(start + i) % num_folds].append(ordered[j])
        start += len(cases)
    every = sorted(c for cases in cases_by_source.values() for c in cases)
    val_sets = [set(v) for v in val]
    return [{"train": [c for c in every if c not in vs], "val": sorted(vs)} for vs in val_sets]
