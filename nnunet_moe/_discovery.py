"""Make nnU-Net find our trainers: append our trainer folder to ``nnUNet_extTrainer``.

nnU-Net 2.8 looks up ``-tr NAME`` in its own trainer package, then in every folder listed
in the environment variable ``nnUNet_extTrainer`` (``os.pathsep``-separated, read at call
time). This module is imported at interpreter start by ``nnunet_moe_discovery.pth``
(installed into site-packages), so every Python process of the environment - the
``nnUNetv2_*`` commands, ``mp.spawn`` workers, data-loader workers - sees the variable
without any manual step. It must stay cheap: no torch, no nnU-Net imports.

Set ``NNUNET_MOE_NO_AUTODISCOVERY=1`` to switch the hook off (then use the line printed by
``nnunet-moe env``); another value keeps it on and ``nnunet-moe env`` stops with an error naming it.
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


NO_AUTODISCOVERY_ENV = "NNUNET_MOE_NO_AUTODISCOVERY"


def autodiscovery_disabled() -> bool:
    """``$NNUNET_MOE_NO_AUTODISCOVERY``: 1/true/yes -> off; 0/false/no/unset -> on; ValueError otherwise."""
    raw = os.environ.get(NO_AUTODISCOVERY_ENV, "").strip().lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("", "0", "false", "no"):
        return False
    raise ValueError(f"{NO_AUTODISCOVERY_ENV}={raw!r} is not a switch: set it to 1 to switch the automatic "
                     f"discovery of nnunet-moe trainers off (then export nnUNet_extTrainer yourself), or unset it")


def install() -> None:
    try:
        if autodiscovery_disabled():
            return
    except ValueError:
        pass  # a Python start must not fail: the hook stays on, `nnunet-moe env` reports the value
    os.environ["nnUNet_extTrainer"] = ext_trainer_value(os.environ.get("nnUNet_extTrainer"))


install()
