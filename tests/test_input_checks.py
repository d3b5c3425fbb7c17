"""The input-checking predictor keeps nnU-Net's method signatures: nnU-Net reads its own parameters back by
name (``inspect.signature`` + ``locals()``), so ``*args`` overrides break every stock prediction."""
from __future__ import annotations

import inspect

import pytest
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_moe.inference.input_checks import InputCheckingPredictor


@pytest.mark.parametrize("method", ["predict_from_files", "predict_from_files_sequential"])
def test_overrides_have_nnunets_parameters_and_defaults(method):
    ours = inspect.signature(getattr(InputCheckingPredictor, method)).parameters
    theirs = inspect.signature(getattr(nnUNetPredictor, method)).parameters
    assert [(n, p.default) for n, p in ours.items()] == [(n, p.default) for n, p in theirs.items()]
