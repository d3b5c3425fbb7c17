"""nnU-Net's three folder variables: checking them with clear messages, setting them for the demo."""
from __future__ import annotations

import os

NNUNET_FOLDER_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def missing_path_vars() -> list:
    return [v for v in NNUNET_FOLDER_VARS if not os.environ.get(v)]


def require_nnunet_paths(purpose: str) -> dict:
    """The three folders, or a RuntimeError that says exactly what to set."""
    missing = missing_path_vars()
    if missing:
        lines = "\n".join(f"  export {v}=/path/to/{v}" for v in missing)
        raise RuntimeError(
            f"{purpose} needs nnU-Net's folder variables, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set. Set them, e.g.\n{lines}\n"
            f"(see nnU-Net's documentation/setting_up_paths.md), or run `nnunet-moe demo`, which sets "
            f"them under its work folder when they are unset."
        )
    return {v: os.environ[v] for v in NNUNET_FOLDER_VARS}


def set_default_paths(work_dir: str) -> list:
    """Point unset nnU-Net folder variables into ``work_dir``; returns the (name, value) pairs set."""
    changed = []
    for var, sub in zip(NNUNET_FOLDER_VARS, ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")):
        if not os.environ.get(var):
            path = os.path.abspath(os.path.join(work_dir, sub))
            os.makedirs(path, exist_ok=True)
            os.environ[var] = path
            changed.append((var, path))
    return changed
