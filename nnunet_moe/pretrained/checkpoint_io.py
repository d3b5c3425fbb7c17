"""Reading checkpoint files for the pretrained-weight loaders: one reader, clear errors.

``read_state_dict`` accepts a bare state dict or one wrapped as ``{"state_dict": ...}``,
``{"network_weights": ...}`` (nnU-Net), ``{"model": ...}`` (timm/VMamba releases) or
``{"model_state_dict": ...}``, and turns every way a file can be wrong (missing, a
directory, random bytes, a truncated download, pickled objects refused by
``weights_only=True``, no tensors) into an error that names the file and says what was
expected. ``read_checkpoint`` reads a whole checkpoint (nnU-Net's: weights plus numpy scalars
in its training log) the same way.

Safety: unpickling a file can run arbitrary code, so every file is read with
``weights_only=True`` (tensors, plain containers and the few types listed by the caller) unless
the caller passes ``trust_checkpoint=True`` or, where it leaves the choice to the user (the
``nnUNetv2_*`` commands cannot pass arguments to us), ``NNUNET_MOE_TRUST_CHECKPOINTS=1`` is set.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import zipfile

import torch

__all__ = ["read_state_dict", "read_checkpoint", "trusted", "numpy_scalar_globals", "TRUST_ENV"]

TRUST_ENV = "NNUNET_MOE_TRUST_CHECKPOINTS"
_WRAPPER_KEYS = ("state_dict", "network_weights", "model", "model_state_dict")
_EXPECTED = ("expected a file written by torch.save holding a state dict (parameter name -> tensor), "
             "optionally wrapped as {'state_dict': ...}, {'network_weights': ...} or {'model': ...}")


def _short(err: BaseException) -> str:
    """One line of an exception message (torch's weights-only errors are long, multi-line advice)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0].split(". Please use `torch.serialization", 1)[0] if lines else ""  # drop allowlisting advice
    return f"{type(err).__name__}: {first}"


def numpy_scalar_globals() -> list:
    """What numpy scalars (nnU-Net's logged losses, ``_best_ema``) pickle to: ``scalar`` and the dtypes.
    Safe to allow: they rebuild a number from raw bytes (an object-dtype scalar's payload is unpickled
    under the same restrictions)."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import scalar
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype
    return [scalar, np.dtype, *([getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes else [])]


def trusted(trust_checkpoint: bool | None) -> bool:
    """The caller's choice, else the user's: ``$NNUNET_MOE_TRUST_CHECKPOINTS`` is ``1`` (``0``/unset: not
    trusted; any other value is an error rather than a silent "no")."""
    if trust_checkpoint is not None:
        return bool(trust_checkpoint)
    raw = os.environ.get(TRUST_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{TRUST_ENV}={raw!r} is not 0 or 1: set it to 1 to load checkpoint files that hold Python "
                         f"objects besides tensors (only files you trust: unpickling can run code), or unset it")
    return raw == "1"


def read_checkpoint(checkpoint_path: str | os.PathLike, trust_checkpoint: bool | None = None,
                    allowed_globals: list = ()):
    """``torch.load`` the file on the CPU, ``weights_only=True`` unless trusted (see :func:`trusted`);
    ``allowed_globals``: further types ``weights_only`` may build (e.g. :func:`numpy_scalar_globals`;
    needs torch >= 2.5). Errors name the file and say what to do."""
    path = os.fspath(checkpoint_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint path {path!r} is a directory; expected a file written by torch.save")
    trust = trusted(trust_checkpoint)
    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with safe(list(allowed_globals)) if allowed_globals and safe and not trust else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        # A valid file with non-allowlisted classes fails with "Unsupported global"; random bytes fail otherwise.
        if not trust and ("unsupported global" in str(err).lower() or "allowlisted" in str(err).lower()):
            raise ValueError(
                f"refused to load {path!r}: it holds Python objects other than tensors and plain containers "
                f"({_short(err)}), and unpickling those can run arbitrary code, so torch.load(weights_only=True) "
                f"refused it (nnU-Net training checkpoints and some release files store such objects next to the "
                f"weights). If you trust this file, call again with trust_checkpoint=True, or set {TRUST_ENV}=1 "
                f"for the nnUNetv2_* / nnunet-moe commands."
            ) from err
        raise ValueError(f"{path!r} is not a readable PyTorch checkpoint ({_short(err)}); {_EXPECTED}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, ImportError) as err:
        if _damaged_zip(path):
            raise ValueError(f"{path!r} is not a readable PyTorch checkpoint: it starts like the zip archive "
                             f"torch.save writes but is incomplete or damaged ({_short(err)}), e.g. an interrupted "
                             f"download or copy; download or copy it again") from err
        raise ValueError(f"{path!r} is not a readable PyTorch checkpoint ({_short(err)}); {_EXPECTED}") from err


def _damaged_zip(path: str) -> bool:
    """The file has torch.save's zip signature but is no complete zip archive (e.g. cut short)."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return False
    return not zipfile.is_zipfile(path)


def read_state_dict(checkpoint_path: str | os.PathLike,
                    trust_checkpoint: bool | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return the (unwrapped) state dict, with clear errors for bad files.
    ``trust_checkpoint=None``: trusted only if ``$NNUNET_MOE_TRUST_CHECKPOINTS`` is ``1``."""
    path = os.fspath(checkpoint_path)
    obj = read_checkpoint(path, trust_checkpoint)
    state = obj
    for _ in range(2):  # e.g. {"state_dict": {...}} or {"network_weights": {...}}
        if isinstance(state, dict):
            wrapper = next((k for k in _WRAPPER_KEYS if k in state and isinstance(state[k], dict)), None)
            if wrapper is not None and not all(isinstance(v, torch.Tensor) for v in state.values()):
                state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(obj).__name__
        keys = list(obj)[:5] if isinstance(obj, dict) else []
        raise ValueError(f"{path!r} holds a {kind}{f' with keys {keys}' if keys else ''}, not a state dict; {_EXPECTED}")
    return state
