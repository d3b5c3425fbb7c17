"""Which nnU-Net predictor is loading a model right now: the hook our trainers have in a fresh ``nnUNetv2_predict``.

nnU-Net's ``initialize_from_trained_model_folder`` imports the checkpoint's trainer and calls its
``build_network_architecture``; that is the first code of ours that runs, with the loading predictor a few
frames up. :func:`loading_locals` finds it there (used by the NMSW predictor adoption, the input checks and
the trainers whose models cannot predict).
"""
from __future__ import annotations

import inspect
from typing import Optional

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


def loading_locals() -> Optional[dict]:
    """Locals of nnU-Net's ``initialize_from_trained_model_folder`` if it is on the call stack (matched by its
    code object, so no other function qualifies), else None."""
    code = nnUNetPredictor.__dict__["initialize_from_trained_model_folder"].__code__
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code is code and isinstance(frame.f_locals.get("self"), nnUNetPredictor):
                return dict(frame.f_locals)
            frame = frame.f_back
        return None
    finally:
        del frame  # a frame reference would keep the callers' locals alive
