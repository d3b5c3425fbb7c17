"""nnU-Net's three folder variables (checked with clear messages, set for the demo) and its console commands."""
from __future__ import annotations

import os
import shutil
import sys

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


def datasets_with_id(dataset_id: int) -> list:
    """Existing folders named Dataset<id>_* in nnUNet_raw/_preprocessed/_results."""
    found = []
    for var in NNUNET_FOLDER_VARS:
        base = os.environ.get(var)
        if base and os.path.isdir(base):
            found += [os.path.join(base, d) for d in os.listdir(base) if d.startswith(f"Dataset{dataset_id:03d}_")]
    return found


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


def nnunet_command(name: str) -> str:
    """Path of a stock nnU-Net console command of this environment."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    found = local if os.path.exists(local) else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"The nnU-Net command {name} was not found next to {sys.executable} nor on PATH; "
                                f"is nnunetv2 installed in this environment (pip install 'nnunetv2>=2.8,<2.9')?")
    return found


def planning_env(**folders) -> dict:
    """The environment for ``nnUNetv2_plan_and_preprocess``, with ``folders`` overriding nnU-Net's variables."""
    env = dict(os.environ)
    env.pop("nnUNet_n_proc_DA", None)  # 0 breaks nnU-Net 2.8.1's planning (torch.set_num_threads(0))
    env.update(folders)
    return env
