"""What ``merge-datasets`` records in the merged ``dataset.json``, and how trainers/predictors read it.

The record is one extra key, ``MERGE_KEY``. nnU-Net 2.8 copies ``dataset.json`` unchanged into
``nnUNet_preprocessed/<dataset>/`` (``ExperimentPlanner.plan_experiment``) and from there into every
results folder (``nnUNetTrainer`` saves ``self.dataset_json``), so the trainer and the predictor of a
merged model see the same record. Format (version ``FORMAT_VERSION``)::

    "nnunet_moe_merge": {
      "format_version": 1,
      "sources": {                       # key = the case-id prefix, "d" + the source's 3-digit id
        "d502": {"dataset": "Dataset502_X", "modality": "CT" | "MR",
                 "channel_names": {...},                       # the source's own, for reference
                 "labels": {"<source name>": "<union name>"},  # foreground labels, after --alias
                 "label_values": {"<source value>": <union value>},
                 "normalisation": {...},                       # see normalisation.py
                 "num_training": n, "num_test": m}},
      "cases": {"d502_case": {"source": "d502", "modality": "CT", "labels": ["liver", ...]}},
      "test_cases": {...same fields, for imagesTs...}
    }

A case's ``labels`` are the union label names its source annotates (background, 0, is implicit):
in every other union class that case's background voxels mean "not annotated", not "absent".
"""
from __future__ import annotations

MERGE_KEY = "nnunet_moe_merge"
FORMAT_VERSION = 1
MODALITIES = ("CT", "MR")


def merge_metadata(dataset_json: dict, where: str = "dataset.json") -> dict:
    """The merge record of ``dataset_json``, or a ValueError saying the dataset was not merged by us."""
    meta = dataset_json.get(MERGE_KEY)
    if not isinstance(meta, dict):
        raise ValueError(f"{where} has no '{MERGE_KEY}' entry: this dataset was not made by "
                         f"`nnunet-moe merge-datasets`. Merge the source datasets with it first, then plan and train "
                         f"on the merged dataset id.")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}: '{MERGE_KEY}' has format_version {version!r}; this nnunet-moe reads version "
                         f"{FORMAT_VERSION}. Re-run `nnunet-moe merge-datasets` with this version.")
    return meta


def case_record(meta: dict, case: str) -> dict:
    """``{"source", "modality", "labels"}`` of a merged training or test case; a clear error for an unknown one."""
    for key in ("cases", "test_cases"):
        if case in meta.get(key, {}):
            return meta[key][case]
    prefixes = ", ".join(sorted(meta["sources"]))
    raise ValueError(f"Case '{case}' is not in this merged dataset, so its source and modality are unknown. Its cases "
                   f"are named <source>_<case> with the sources {prefixes}; merge its dataset in with "
                   f"`nnunet-moe merge-datasets` (and retrain), or give a case of one of these sources.")


# {"modalities": [...]}: the experts of both M4oE stages, in the plans nnU-Net saves with the model, so that
# its predictor (which has no merge record at hand) rebuilds the same network
PLANS_KEY = "nnunet_moe_m4oe"


def expert_modalities(plans: dict) -> list[str]:
    """The modalities the M4oE experts of ``plans`` stand for, in expert order (empty: one dense MLP)."""
    return list(plans.get(PLANS_KEY, {}).get("modalities", []))


def modality_order(meta: dict) -> list[str]:
    """The merged dataset's modalities in expert order: expert ``i`` is ``modality_order(meta)[i]``
    (fixed order ``MODALITIES``, not source order, so re-merging in another order keeps the experts)."""
    present = {s["modality"] for s in meta["sources"].values()}
    return [m for m in MODALITIES if m in present]
