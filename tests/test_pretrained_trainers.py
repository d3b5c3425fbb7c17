"""Every pretrained trainer without its weights variable: one message that says what to set or use instead
(the shared rule is ``training.base.pretrained_weights_path``)."""
from __future__ import annotations

import pytest

from nnunet_moe.training import moe_sam_trainer, swin_umamba_trainer
from trainer_fixtures import make_trainer


@pytest.mark.parametrize("trainer, configuration, expected", [
    (moe_sam_trainer.nnUNetTrainerMoESAM, "2d", "Set NNUNET_MOE_SAM_WEIGHTS=/path/to/sam_vit_b_01ec64.pth.*MoESAMScratch"),
    (swin_umamba_trainer.nnUNetTrainerSwinUMamba, "2d", "Set NNUNET_MOE_VMAMBA_WEIGHTS=.*nnUNetTrainerSwinUMambaScratch"),
])
def test_pretrained_trainer_without_weights_says_what_to_do(trainer, configuration, expected, tmp_path, monkeypatch):
    monkeypatch.delenv(trainer.weights_env, raising=False)
    tr = make_trainer(trainer, configuration, tmp_path, monkeypatch)
    with pytest.raises(RuntimeError, match=expected):
        tr.initialize()
