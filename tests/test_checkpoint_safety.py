"""Checkpoints this package reads itself are read with ``weights_only=True`` unless the user trusts them.

The malicious file holds an object whose unpickling creates a marker file (what an attacker's code could
do): refused, the marker must not exist; trusted (argument or ``NNUNET_MOE_TRUST_CHECKPOINTS=1``), the
object is unpickled and the marker appears, which shows the refusal is what kept it from running.
"""
from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
import torch

from nnunet_moe.pretrained.checkpoint_io import TRUST_ENV, read_state_dict

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "nnunet_moe"


class _WritesMarker:
    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):  # unpickling calls Path(marker).touch()
        return pathlib.Path.touch, (self.marker,)


def _malicious(tmp_path, payload: dict) -> tuple[pathlib.Path, pathlib.Path]:
    marker = tmp_path / "code_ran"
    path = tmp_path / "malicious.pth"
    torch.save({**payload, "extra": _WritesMarker(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_malicious_state_dict_is_refused_unless_trusted(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    path, marker = _malicious(tmp_path, {"model": {"w": torch.ones(2)}})
    with pytest.raises(ValueError, match=r"refused to load .*malicious\.pth.*can run arbitrary code.*"
                                         r"trust_checkpoint=True.*NNUNET_MOE_TRUST_CHECKPOINTS=1") as error:
        read_state_dict(path)
    assert "Unsupported global: GLOBAL getattr was not an allowed global" in str(error.value)  # what it refused
    assert not marker.exists()
    monkeypatch.setenv(TRUST_ENV, "1")
    with pytest.raises(ValueError, match="refused"):
        read_state_dict(path, trust_checkpoint=False)  # the caller's explicit choice wins over the variable
    assert not marker.exists()
    monkeypatch.delenv(TRUST_ENV)
    assert torch.equal(read_state_dict(path, trust_checkpoint=True)["w"], torch.ones(2))
    assert marker.exists()


def test_trust_variable_reaches_the_trainers_vmamba_loader(tmp_path, monkeypatch):
    """The trainers call the loader without a trust argument: the variable is how a user of nnUNetv2_train
    trusts a file."""
    from nnunet_moe.networks.swin_umamba import SwinUMambaD, VSSEncoder
    from nnunet_moe.pretrained.vmamba_weights import load_vmamba_encoder_weights

    dims = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))
    state = VSSEncoder(in_channels=3, patch_size=4, spatial_dims=2, **dims).state_dict()
    path, marker = _malicious(tmp_path, {"model": state})
    net = SwinUMambaD(1, 2, decoder_depths=(1, 1, 1), **dims)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(ValueError, match="refused to load"):
        load_vmamba_encoder_weights(net, path)
    assert not marker.exists()
    monkeypatch.setenv(TRUST_ENV, "1")
    assert len(load_vmamba_encoder_weights(net, path).loaded) == len(state)
    assert marker.exists()


def _nnunet_checkpoint(tmp_path, monkeypatch) -> pathlib.Path:
    """A checkpoint written by nnU-Net's own save_checkpoint (numpy scalars in its log, a torch.device)."""
    from trainer_fixtures import make_trainer, network_for

    from nnunet_moe.training.swin_umamba_trainer import nnUNetTrainerSwinUMambaDScratch

    tr = make_trainer(nnUNetTrainerSwinUMambaDScratch, "2d", tmp_path, monkeypatch)
    tr.network = network_for(tr)
    tr.optimizer, tr.lr_scheduler = tr.configure_optimizers()
    for key, value in (("train_losses", np.float64(0.5)), ("val_losses", np.float32(0.4)), ("lrs", 1e-4),
                       ("epoch_start_timestamps", 1.0), ("epoch_end_timestamps", 2.0),
                       ("dice_per_class_or_region", [np.float64(0.1), np.float64(0.2)]),
                       ("mean_fg_dice", np.float64(0.15))):
        tr.logger.log(key, value, 0)
    tr._best_ema = tr.logger.get_value("ema_fg_dice", step=-1)
    path = pathlib.Path(tr.output_folder) / "checkpoint_final.pth"
    tr.save_checkpoint(str(path))
    return path


def test_nnunet_checkpoints_are_read_without_unpickling_code(tmp_path, monkeypatch):
    """nnU-Net's checkpoints (numpy scalars in their log) are readable with weights_only; other objects are not."""
    from nnunet_moe.pretrained.checkpoint_io import numpy_scalar_globals, read_checkpoint

    monkeypatch.delenv(TRUST_ENV, raising=False)
    real = _nnunet_checkpoint(tmp_path, monkeypatch)
    assert read_checkpoint(str(real), allowed_globals=numpy_scalar_globals())["trainer_name"] == \
        "nnUNetTrainerSwinUMambaDScratch"

    path, marker = _malicious(tmp_path, {"trainer_name": "nnUNetTrainerNMSW", "network_weights": {}})
    with pytest.raises(ValueError, match="refused to load .*arbitrary code"):
        read_checkpoint(str(path), allowed_globals=numpy_scalar_globals())
    assert not marker.exists()
    monkeypatch.setenv(TRUST_ENV, "1")
    assert read_checkpoint(str(path), allowed_globals=numpy_scalar_globals())["trainer_name"] == "nnUNetTrainerNMSW"
    assert marker.exists()


def _torch_load_calls(source: str) -> int:
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)]
    return sum(isinstance(c.func, ast.Attribute) and c.func.attr == "load" and isinstance(c.func.value, ast.Name)
               and c.func.value.id == "torch" for c in calls)


def test_every_torch_load_of_the_package_goes_through_checkpoint_io():
    """One reader decides weights_only; a new torch.load elsewhere would bypass it."""
    callers = {str(f.relative_to(PACKAGE)): n for f in PACKAGE.rglob("*.py") if (n := _torch_load_calls(f.read_text()))}
    assert callers == {"pretrained/checkpoint_io.py": 1}
