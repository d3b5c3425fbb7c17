"""``nnUNetv2_train --c`` after a SIGKILL, for the architectures whose extra state no other test resumes.

Already covered elsewhere (``conftest.train_killed_then_resumed``): Swin SMT (MoE experts,
test_e2e_hippocampus.py), Swin-UMamba / Swin-UMamba-dagger from scratch 2d / 3d (test_swin_umamba_e2e.py),
MoE-SAM (test_moe_sam_e2e.py); the pretrained Swin-UMamba-dagger frozen set through an in-process
interruption under DDP (test_ddp_cpu.py). Here, each killed once its first checkpoint exists and resumed
to the end by the stock command:

- NMSW-Net: selection (objectness head), global and local networks, and the optimizer state;
- M4oE (2d): the network rebuilt from the experts recorded in the plans, and the optimizer state;
- pretrained Swin-UMamba (2d) in a single process: the encoder frozen for 2 of 3 epochs, killed after
  epoch 0, resumed without the weights variable: epoch 1 still frozen, epoch 2 not.

AdamW keeps a step count per parameter, which tells what happened in the process that nobody watched:
a parameter trained in every iteration of 3 epochs has step 3 x iterations only if the resumed run
continued the interrupted run's optimizer state; a parameter frozen in epochs 0 and 1 has step
iterations (epoch 2's) only if the resumed run froze it again.
"""
from __future__ import annotations

import os
import re
import textwrap

import pytest
import torch

from conftest import train_killed_then_resumed

pytestmark = pytest.mark.e2e

ITERS = 3


def _steps(checkpoint: dict) -> dict:
    """AdamW step count per parameter index (parameters that never had a gradient have no state)."""
    return {index: float(state["step"]) for index, state in checkpoint["optimizer_state"]["state"].items()}


def _resumed_from_epoch_1(res: dict, epochs: int) -> None:
    assert res["at_kill"]["current_epoch"] == 1 and res["final"]["current_epoch"] == epochs
    assert "Epoch 1" in res["resumed_log"] and "Epoch 0\n" not in res["resumed_log"]


def test_nmsw_resumes_selection_and_optimizer_state(nnunet_env):
    trainer = f"nnUNetTrainerNMSW_3epochs_{ITERS}iters_lr1en3"
    no_tta = dict(nnunet_env, train_env=dict(nnunet_env["train_env"], NNUNET_MOE_NMSW_TTA="0"))
    res = train_killed_then_resumed(no_tta, trainer, "3d_fullres")
    saved, final = res["at_kill"], res["final"]
    _resumed_from_epoch_1(res, 3)
    # every trained parameter stepped in every iteration of all three epochs: the resumed run went on with the
    # interrupted run's AdamW moments and counts (a fresh optimizer would end at 2 x ITERS)
    assert set(_steps(saved).values()) == {float(ITERS)}
    assert set(_steps(final).values()) == {float(3 * ITERS)}
    assert len(_steps(final)) == len(_steps(saved)) > 0
    before, after = saved["network_weights"], final["network_weights"]
    # the CNNs' unused lower-resolution heads never train: equal to the checkpoint at the kill only because the
    # resumed run loaded it (a new network would have other random values)
    heads = [k for k in after if re.match(r"(global|local)_net\.decoder\.seg_layers\.\d+\.", k)]
    last = {net: max(int(k.split(".")[3]) for k in heads if k.startswith(net)) for net in ("global_net", "local_net")}
    unused = [k for k in heads if int(k.split(".")[3]) < last[k.split(".")[0]]]
    assert unused and all(torch.equal(before[k], after[k]) for k in unused)
    # a hippocampus volume is smaller than one patch: a one-cell grid, whose selection weight is 1 whatever the
    # objectness, so the objectness head gets no gradient; equal to the kill's values because the run loaded them
    selection = [k for k in after if k.startswith("objectness_head.")]
    assert selection and all(torch.equal(before[k], after[k]) for k in selection)
    # both networks and the aggregation trained on from there
    for prefix in ("global_net.encoder.", "local_net.encoder.", "aggregation."):
        keys = [k for k in after if k.startswith(prefix)]
        assert keys and any(not torch.equal(before[k], after[k]) for k in keys), prefix


PRETRAINED_TRAINER = "nnUNetTrainerSwinUMambaFrozenTwoEpochs"
# A test-only variant (found through nnUNet_extTrainer like any external trainer): pretrained Swin-UMamba,
# 3 epochs of ITERS iterations with batch 4, encoder frozen for the first 2. The final validation (about
# 5 min for this network on a CPU, and run by tests/test_swin_umamba_e2e.py) is left out.
PRETRAINED_MODULE = f'''
from nnunet_moe.training.short_schedule import short_schedule_trainer
from nnunet_moe.training.swin_umamba_trainer import nnUNetTrainerSwinUMamba


class {PRETRAINED_TRAINER}(short_schedule_trainer(nnUNetTrainerSwinUMamba, 3, {ITERS}, 4, 1e-3)):
    freeze_encoder_epochs = 2

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation left out (resume test)")
'''


def test_pretrained_swin_umamba_resumes_frozen_encoder_then_unfreezes(nnunet_env, tmp_path):
    from test_ddp_cpu import _write_vmamba_tiny

    from nnunet_moe.networks.swin_umamba import SwinUMamba
    from nnunet_moe.training.freezing import FreezableAdamW

    trainers = tmp_path / "trainers"
    trainers.mkdir()
    (trainers / "resume_test_trainers.py").write_text(textwrap.dedent(PRETRAINED_MODULE))
    weights = str(tmp_path / "vssmtiny.pth")
    _write_vmamba_tiny(weights)
    env = dict(nnunet_env["train_env"], NNUNET_MOE_VMAMBA_WEIGHTS=weights, nnUNet_extTrainer=str(trainers))
    res = train_killed_then_resumed(dict(nnunet_env, train_env=env), PRETRAINED_TRAINER, "2d")
    saved, final = res["at_kill"], res["final"]
    _resumed_from_epoch_1(res, 3)

    names = [name for name, _ in SwinUMamba(1, 3, spatial_dims=2, deep_supervision=True).named_parameters()]
    assert len(names) == len(saved["optimizer_state"]["param_groups"][0]["params"])
    frozen = [names[i] for i in saved["optimizer_state"][FreezableAdamW.STATE_KEY]]
    vmamba = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    # 2d: the whole VSS encoder but its patch embedding (trained from the start, as in the paper) is loaded
    assert frozen and frozen == [n for n in names if n.startswith("encoder.") and not
                                 n.startswith("encoder.patch_embed.") and n[len("encoder."):] in vmamba]
    before, after = saved["network_weights"], final["network_weights"]
    assert all(torch.equal(before[n], vmamba[n[len("encoder."):]]) for n in frozen)  # epoch 0: frozen

    # the resumed process did not read the weights variable: the frozen set came back from the checkpoint
    assert "NNUNET_MOE_VMAMBA_WEIGHTS=" not in res["resumed_log"]
    assert f"VSS encoder frozen until epoch 2: {len(frozen)} of " in res["resumed_log"]
    logs = sorted(f for f in os.listdir(res["fold_dir"]) if f.startswith("training_log"))
    with open(os.path.join(res["fold_dir"], logs[-1])) as f:
        assert "VSS encoder unfrozen at epoch 2: every parameter trains" in f.read()
    assert final["optimizer_state"][FreezableAdamW.STATE_KEY] == []

    # step counts: frozen ones stepped in epoch 2 only, i.e. they stayed frozen through epoch 1 after the resume
    steps_at_kill, steps = _steps(saved), _steps(final)
    frozen_index = {names.index(n) for n in frozen}
    assert not frozen_index & set(steps_at_kill) and set(steps_at_kill.values()) == {float(ITERS)}
    assert {steps[i] for i in frozen_index} == {float(ITERS)}
    assert {s for i, s in steps.items() if i not in frozen_index} == {float(3 * ITERS)}
    assert sum(not torch.equal(before[n], after[n]) for n in frozen) >= 0.95 * len(frozen)  # epoch 2 trained them


def test_m4oe_resumes_its_network_and_optimizer_state(nnunet_env):
    """M4oE's experts are rebuilt from the plans key the trainer writes (here a plain dataset: dense MLPs), so
    the resumed process must build the same network from the same plans and continue the optimizer."""
    from nnunet_moe.datasets.metadata import PLANS_KEY

    trainer = f"nnUNetTrainerM4oESmall_3epochs_{ITERS}iters_lr1en3"
    res = train_killed_then_resumed(nnunet_env, trainer, "2d")
    saved, final = res["at_kill"], res["final"]
    _resumed_from_epoch_1(res, 3)
    assert saved["init_args"]["plans"][PLANS_KEY] == final["init_args"]["plans"][PLANS_KEY] == {"modalities": []}
    assert set(_steps(saved).values()) == {float(ITERS)}
    assert set(_steps(final).values()) == {float(3 * ITERS)}
    before, after = saved["network_weights"], final["network_weights"]
    assert before.keys() == after.keys()
    for prefix in ("encoder.", "decoder."):
        keys = [k for k in after if k.startswith(prefix)]
        assert keys and any(not torch.equal(before[k], after[k]) for k in keys), prefix
