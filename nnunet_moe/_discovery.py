"""Make nnU-Net find our trainers: append our trainer folder to ``nnUNet_extTrainer``.

nnU-Net 2.8 looks up ``-tr NAME`` in its own trainer package, then in every folder listed
in the environment variable ``nnUNet_extTrainer`` (``os.pathsep``-separated, read at call
time). This module is imported at interpreter start by ``nnunet_moe_discovery.pth``
(installed into site-packages), so every Python process of the environment - the
``nnUNetv2_*`` commands, ``mp.spawn`` workers, data-loader workers - sees the variable
without any manual step. It must stay cheap: no torch, no nnU-Net imports.

Set ``NNUNET_MOE_NO_AUTODISCOVERY=1`` to switch the hook off (then use the line printed by
``nnunet-moe env``).
"""
import os

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_MARKER = "__init__.py"


def trainer_folder() -> str:
    """The folder of thin re-export modules that nnU-Net's trainer search imports.

    Installed wheel: ``<site-packages>/nnunet_moe/trainers``. Source checkout or editable
    install: ``<repo>/trainers``.
    """
    for candidate in (os.path.join(_PKG_DIR, "trainers"), os.path.join(os.path.dirname(_PKG_DIR), "trainers")):
        if os.path.isfile(os.path.join(candidate, _MARKER)) and os.path.isfile(
            os.path.join(candidate, "nnunet_moe_trainers.py")
        ):
            return candidate
    raise FileNotFoundError(
        f"nnunet-moe's trainer folder was not found next to {_PKG_DIR}; reinstall the package "
        f"(pip install nnunet-moe) or run from a complete source checkout."
    )


def ext_trainer_value(current: str | None) -> str:
    """``nnUNet_extTrainer`` with our folder appended (kept once; user entries stay first)."""
    folder = trainer_folder()
    entries = [p for p in (current or "").split(os.pathsep) if p.strip()]
    if any(os.path.abspath(p) == folder for p in entries):
        return os.pathsep.join(entries)
    return os.pathsep.join(entries + [folder])


def install() -> None:
    if os.environ.get("NNUNET_MOE_NO_AUTODISCOVERY", "").lower() in ("1", "true", "yes"):
        return
    os.environ["nnUNet_extTrainer"] = ext_trainer_value(os.environ.get("nnUNet_extTrainer"))


install()
