"""Reading checkpoint files for the pretrained-weight loaders: one reader, clear errors.

``read_state_dict`` accepts a bare state dict or one wrapped as ``{"state_dict": ...}``,
``{"network_weights": ...}`` (nnU-Net), ``{"model": ...}`` (timm/VMamba releases) or
``{"model_state_dict": ...}``, and turns every way a file can be wrong (missing, a
directory, random bytes, a truncated download, pickled objects refused by
``weights_only=True``, no tensors) into an error that names the file and says what was
expected.
"""
from __future__ import annotations

import os
import pickle
import zipfile

import torch

__all__ = ["read_state_dict"]

_WRAPPER_KEYS = ("state_dict", "network_weights", "model", "model_state_dict")


def _short(err: BaseException) -> str:
    """One line of an exception message (torch's weights-only errors are long, multi-line advice)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def read_state_dict(checkpoint_path: str | os.PathLike, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return the (unwrapped) state dict, with clear errors for bad files."""
    path = os.fspath(checkpoint_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint path {path!r} is a directory; expected a file written by torch.save")
    expected = (
        "expected a file written by torch.save holding a state dict (parameter name -> tensor), "
        "optionally wrapped as {'state_dict': ...}, {'network_weights': ...} or {'model': ...}"
    )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as err:
        # A valid file with non-allowlisted classes fails with "Unsupported global"; random bytes fail otherwise.
        if not trust_checkpoint and "unsupported global" in str(err).lower():
            raise ValueError(
                f"{path!r} contains Python objects other than tensors and plain containers, which torch.load "
                "refuses with weights_only=True (nnU-Net checkpoints store such objects next to the weights). "
                "If you trust this file, call again with trust_checkpoint=True."
            ) from err
        raise ValueError(f"{path!r} is not a readable PyTorch checkpoint ({_short(err)}); {expected}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, ImportError) as err:
        raise ValueError(f"{path!r} is not a readable PyTorch checkpoint ({_short(err)}); {expected}") from err

    state = obj
    for _ in range(2):  # e.g. {"state_dict": {...}} or {"network_weights": {...}}
        if isinstance(state, dict):
            wrapper = next((k for k in _WRAPPER_KEYS if k in state and isinstance(state[k], dict)), None)
            if wrapper is not None and not all(isinstance(v, torch.Tensor) for v in state.values()):
                state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(obj).__name__
        keys = list(obj)[:5] if isinstance(obj, dict) else []
        raise ValueError(f"{path!r} holds a {kind}{f' with keys {keys}' if keys else ''}, not a state dict; {expected}")
    return state
