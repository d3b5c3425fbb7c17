"""M4oE stage 1 (Swin-MAE pretraining) and the stage-2 loader: masking, loss, expert isolation, weights file.

Networks here are CPU-sized (embed 12, one block per stage, 32x32 images: an 8x8 token grid of four 4x4
masking windows); the trainer test with the real network size is in tests/test_learning.py.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from nnunet_moe.datasets.metadata import MERGE_KEY
from nnunet_moe.layers.m4oe import M4oE
from nnunet_moe.layers.window_masking import WindowMasking
from nnunet_moe.networks.m4oe import M4oESwinUnet
from nnunet_moe.networks.m4oe_mae import M4oEMAE, masked_patch_mse, patchify
from nnunet_moe.pretrained.m4oe_mae_weights import load_m4oe_mae_weights, save_m4oe_mae_weights
from nnunet_moe.training.m4oe_pretrain_trainer import MaskedReconstructionLoss
from trainer_fixtures import hippocampus_dataset_json, hippocampus_plans

TINY = dict(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))


def tiny_mae(num_experts=2, seed=0, **kw) -> M4oEMAE:
    torch.manual_seed(seed)
    return M4oEMAE(1, num_experts=num_experts, **{**TINY, **kw})


def tiny_unet(num_experts=2, seed=1, **kw) -> M4oESwinUnet:
    torch.manual_seed(seed)
    arch = {**TINY, **kw}
    return M4oESwinUnet(1, 3, num_experts=num_experts, gate="experts", decoder_depths=(1, 1, 1), **arch)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# -- masking -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,grid,masked_windows", [(0.75, (16, 12), 9), (0.75, (8, 8), 3), (0.5, (16, 16), 8),
                                                        (0.6, (16, 16), 10)])
def test_window_masking_masks_an_exact_number_of_whole_windows(ratio, grid, masked_windows):
    layer = WindowMasking(8, ratio, 4)
    tokens = torch.randn(3, *grid, 8)
    out, mask = layer(tokens, seeded(1))
    assert mask.shape == (3, *grid) and mask.dtype == torch.bool
    assert mask.flatten(1).sum(1).tolist() == [masked_windows * 16] * 3  # exactly, in every sample
    windows = mask.reshape(3, grid[0] // 4, 4, grid[1] // 4, 4)
    assert (windows == windows[:, :, :1, :, :1]).all()  # every 4x4 window all masked or all kept
    assert torch.equal(out[mask], layer.mask_token.detach().expand(int(mask.sum()), 8))  # replaced, not dropped
    assert torch.equal(out[~mask], tokens[~mask])
    assert torch.equal(layer(tokens, seeded(1))[1], mask)  # reproducible with a generator
    assert not torch.equal(layer(tokens, seeded(2))[1], mask)
    assert not all(torch.equal(mask[0], mask[i]) for i in (1, 2))  # drawn per sample


def test_window_masking_refuses_a_grid_of_partial_windows():
    with pytest.raises(ValueError, match=r"token grid \(8, 6\) must be a multiple of the 4-token masking window"):
        WindowMasking(8)(torch.randn(1, 8, 6, 8))
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        WindowMasking(8, 1.0)


def test_mask_token_is_a_learned_parameter_with_the_gradient_of_every_masked_token():
    layer = WindowMasking(8)
    assert [name for name, _ in layer.named_parameters()] == ["mask_token"]
    out, mask = layer(torch.randn(2, 8, 8, 8, requires_grad=True), seeded())
    out.sum().backward()
    assert torch.equal(layer.mask_token.grad, torch.full((8,), float(mask.sum())))


# -- loss ---------------------------------------------------------------------------------------------------
def test_patchify_puts_each_tokens_pixels_in_its_patch():
    image = torch.arange(2 * 8 * 4, dtype=torch.float).reshape(1, 2, 8, 4)  # 2 channels, patches 4x4 -> grid 2x1
    patches = patchify(image, 4)
    assert patches.shape == (1, 2, 1, 32)
    assert torch.equal(patches[0, 1, 0], image[0, :, 4:8, 0:4].permute(1, 2, 0).flatten())


def test_masked_patch_mse_by_hand():
    target = torch.tensor([[[[1.0, 1.0], [2.0, 0.0]], [[0.0, 0.0], [3.0, 1.0]]]])  # (B=1, 2x2 patches, 2 pixels)
    pred = torch.zeros_like(target)
    mask = torch.tensor([[[True, False], [False, True]]])
    # masked patches (0,0) and (1,1): MSE (1+1)/2 = 1 and (9+1)/2 = 5 -> mean 3; the others do not count
    assert masked_patch_mse(pred, target, mask).item() == pytest.approx(3.0)
    changed = pred.clone()
    changed[0, 0, 1] = 100.0  # an unmasked patch
    assert masked_patch_mse(changed, target, mask).item() == pytest.approx(3.0)
    changed[0, 1, 1, 0] = 3.0  # a masked patch, now right on one pixel: (0+1)/2 = 0.5 -> mean 0.75
    assert masked_patch_mse(changed, target, mask).item() == pytest.approx(0.75)


def test_model_loss_counts_the_masked_patches_only():
    model = tiny_mae().eval()
    images, modality = torch.randn(2, 1, 32, 32), torch.tensor([0, 1])
    with torch.no_grad():
        out = model(images, modality, seeded(3))
    assert out.pred.shape == (2, 8, 8, 16) and out.mask.float().mean().item() == 0.75
    assert out.loss.item() == pytest.approx(masked_patch_mse(out.pred, patchify(images, 4), out.mask).item())

    def shift(where):
        def hook(module, args, pred):
            return pred + 10.0 * where.unsqueeze(-1)
        return model.decoder.register_forward_hook(hook)

    for where, same in ((~out.mask, True), (out.mask, False)):
        handle = shift(where.float())
        with torch.no_grad():
            loss = model(images, modality, seeded(3)).loss.item()
        handle.remove()
        assert (loss == pytest.approx(out.loss.item())) is same


# -- experts ------------------------------------------------------------------------------------------------
def expert_grads(model, modality) -> list:
    model.zero_grad()
    model(torch.randn(len(modality), 1, 32, 32), torch.tensor(modality), seeded()).loss.backward()
    layers = [m for m in model.encoder.modules() if hasattr(m, "experts")]
    assert len(layers) == 4  # one M4oE layer per encoder block
    return [float(sum(layer.experts.fc1_weight.grad[e].abs().sum() + layer.experts.fc2_bias.grad[e].abs().sum()
                      for layer in layers)) for e in range(2)]


def test_each_modality_trains_only_its_own_expert():
    model = tiny_mae()
    first, second = expert_grads(model, [0, 0]), expert_grads(model, [1, 1])
    assert first[0] > 0 and first[1] == 0.0  # exactly: the other expert's output is multiplied by 0
    assert second[0] == 0.0 and second[1] > 0
    assert min(expert_grads(model, [0, 1])) > 0
    with pytest.raises(ValueError, match=r"2 experts, one per modality: pass each sample's modality"):
        model(torch.randn(1, 1, 32, 32))


# -- the weights file ---------------------------------------------------------------------------------------
def test_round_trip_into_the_fine_tuning_network(tmp_path):
    mae = tiny_mae(seed=5)
    path = save_m4oe_mae_weights(mae, str(tmp_path / "m4oe_mae_encoder.pth"), ["CT", "MR"], epoch=3)
    net = tiny_unet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = load_m4oe_mae_weights(net, path, modalities=["CT", "MR"])
    after = net.state_dict()
    encoder = {f"encoder.{k}": v for k, v in mae.encoder.state_dict().items()}
    assert encoder and all(torch.equal(after[k], v) for k, v in encoder.items())
    assert not torch.equal(before["encoder.patch_embed.proj.weight"], after["encoder.patch_embed.proj.weight"])
    assert report.loaded == sorted(encoder) and not report.unexpected
    gates = [k for k in after if k.startswith("encoder.") and ".mlp.gate." in k]
    assert len(gates) == 4 * 2 and set(gates) <= set(report.missing)  # weight + bias per encoder block
    assert all(k.startswith("decoder.") or k in gates for k in report.missing)
    assert set(report.missing) == set(after) - set(encoder)
    assert all(torch.equal(after[k], before[k]) for k in report.missing)  # gate and decoder keep their init
    assert "M4oE MAE encoder" in report.summary()
    with pytest.raises(ValueError, match=r"experts \['CT', 'MR'\] \(in this order\), but this network's experts "
                                         r"are \['MR', 'CT'\]"):
        load_m4oe_mae_weights(tiny_unet(), path, modalities=["MR", "CT"])


@pytest.mark.parametrize("experts,match", [(3, r"2 experts \(modalities CT, MR\), but this network has 3 experts"),
                                           (0, r"but this network has no experts \(dense MLPs")])
def test_expert_count_mismatch_is_a_clear_error(tmp_path, experts, match):
    path = save_m4oe_mae_weights(tiny_mae(), str(tmp_path / "w.pth"), ["CT", "MR"])
    net = tiny_unet(num_experts=experts)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_m4oe_mae_weights(net, path)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing was loaded


def test_another_encoder_architecture_is_refused(tmp_path):
    path = save_m4oe_mae_weights(tiny_mae(), str(tmp_path / "w.pth"), ["CT", "MR"])
    with pytest.raises(ValueError, match=r"another encoder architecture .*tensors do not match this network"):
        load_m4oe_mae_weights(tiny_unet(embed_dim=24, num_heads=(1, 2, 2, 4)), path)
    with pytest.raises(ValueError, match="in_channels=1, this network has in_channels=2"):
        load_m4oe_mae_weights(M4oESwinUnet(2, 3, num_experts=2, decoder_depths=(1, 1, 1), **TINY), path)


def foreign_files() -> dict:
    t = torch.zeros(2)
    return {
        "VMamba checkpoint": {"model": {"layers.0.blocks.0.ln_1.weight": t, "head.weight": t}},
        "SAM checkpoint": {"image_encoder.patch_embed.proj.weight": t},
        "Swin UNETR / Swin-ViT checkpoint": {"state_dict": {"module.swinViT.patch_embed.proj.weight": t}},
        r"nnU-Net training checkpoint of nnUNetTrainerM4oEPretrain \(the pretraining run's own checkpoint: use "
        r"m4oe_mae_encoder.pth in the same folder\)": {
            "network_weights": {"encoder.norm.weight": t}, "trainer_name": "nnUNetTrainerM4oEPretrain",
            "_best_ema": np.float64(0.5), "current_epoch": 3},
        "bare state dict of an M4oE network": tiny_unet().state_dict(),
    }


@pytest.mark.parametrize("what", list(foreign_files()))
def test_a_file_of_another_architecture_is_named_with_what_to_do(tmp_path, what):
    path = str(tmp_path / "other.pth")
    torch.save(foreign_files()[what], path)
    with pytest.raises(ValueError, match=f"is an? {what}.*not an M4oE MAE weights file.*Point "
                                         f"NNUNET_MOE_M4OE_MAE_WEIGHTS at the m4oe_mae_encoder.pth"):
        load_m4oe_mae_weights(tiny_unet(), path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_m4oe_mae_weights(tiny_unet(), str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_m4oe_mae_weights(tiny_unet(), str(tmp_path / "junk.pth"))


# -- the trainer --------------------------------------------------------------------------------------------
def merged_dataset_json() -> dict:
    dj = hippocampus_dataset_json()
    names = [n for n in dj["labels"] if n != "background"]
    dj[MERGE_KEY] = {"format_version": 1,
                     "sources": {"d502": {"dataset": "Dataset502_A", "modality": "MR"},
                                 "d501": {"dataset": "Dataset501_B", "modality": "CT"}},
                     "cases": {"d502_x": {"source": "d502", "modality": "MR", "labels": names},
                               "d501_y": {"source": "d501", "modality": "CT", "labels": names[:1]}}}
    return dj


def test_trainer_routes_each_case_to_its_modalitys_expert_and_saves_the_weights_file(tmp_path, monkeypatch):
    import trainer_fixtures
    from nnunet_moe.training.m4oe_pretrain_trainer import nnUNetTrainerM4oEPretrain
    from nnunet_moe.datasets.metadata import PLANS_KEY

    monkeypatch.setattr(trainer_fixtures, "hippocampus_dataset_json", merged_dataset_json)
    trainer = trainer_fixtures.make_trainer(nnUNetTrainerM4oEPretrain, "2d", tmp_path, monkeypatch)
    assert trainer.plans_manager.plans[PLANS_KEY] == {"modalities": ["CT", "MR"]}
    assert trainer.configuration_manager.patch_size == [64, 32]
    assert isinstance(trainer._build_loss(), MaskedReconstructionLoss)
    trainer.network = tiny_mae()
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()  # what nnU-Net's initialize sets
    assert trainer.optimizer.defaults["betas"] == (0.9, 0.95)
    # MAE's groups: weight decay 0.05 on the weight matrices, none on biases and norm weights (1-d tensors)
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    named = dict(trainer.network.named_parameters())
    assert {decay[id(p)] for n, p in named.items() if p.ndim <= 1 or n.endswith(".bias")} == {0.0}
    assert {decay[id(p)] for n, p in named.items() if p.ndim > 1 and not n.endswith(".bias")} == {0.05}
    assert len(decay) == len(named)
    seen = []
    layer = next(m for m in trainer.network.modules() if isinstance(m, M4oE))
    layer.register_forward_pre_hook(lambda module, args: seen.append(args[1].tolist()))
    batch = {"data": torch.randn(3, 1, 32, 32), "target": torch.zeros(3, 1, 32, 32),
             "keys": ["d502_x", "d501_y", "d502_x"]}
    assert np.isfinite(trainer.train_step(batch)["loss"])
    assert seen == [[1, 0, 1]]  # MR is expert 1, CT expert 0 (the fixed order nnUNetTrainerM4oE uses too)
    val = trainer.validation_step(dict(batch, keys=["d501_y"] * 3))["loss"]
    assert np.isfinite(val) and seen[-1] == [0, 0, 0]
    os.makedirs(trainer.output_folder, exist_ok=True)
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    report = load_m4oe_mae_weights(tiny_unet(), trainer.weights_path, modalities=["CT", "MR"])
    assert report.loaded


def test_predicting_with_a_pretraining_model_refuses(tmp_path, monkeypatch):
    import json

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folder = tmp_path / "nnUNetTrainerM4oEPretrain__nnUNetPlans__2d"
    (folder / "fold_0").mkdir(parents=True)
    for name, content in (("plans.json", hippocampus_plans()), ("dataset.json", hippocampus_dataset_json())):
        (folder / name).write_text(json.dumps(content))
    torch.save({"network_weights": {}, "trainer_name": "nnUNetTrainerM4oEPretrain",
                "init_args": {"configuration": "2d"}, "inference_allowed_mirroring_axes": None},
               folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(RuntimeError, match="stage-1 masked-autoencoder pretraining: its model reconstructs masked "
                                           "images and cannot segment, so nnUNetv2_predict cannot use it"):
        nnUNetPredictor(device=torch.device("cpu")).initialize_from_trained_model_folder(str(folder), (0,))


def test_stage_one_encoder_is_the_stage_two_networks_encoder_key_for_key(tmp_path, monkeypatch):
    """The full-size networks both trainers build (on the meta device: shapes only, no memory, no time)."""
    import trainer_fixtures
    from nnunet_moe.training.m4oe_pretrain_trainer import nnUNetTrainerM4oEPretrain
    from nnunet_moe.training.m4oe_trainer import nnUNetTrainerM4oE

    monkeypatch.setattr(trainer_fixtures, "hippocampus_dataset_json", merged_dataset_json)
    shapes = {}
    for cls in (nnUNetTrainerM4oEPretrain, nnUNetTrainerM4oE):
        trainer = trainer_fixtures.make_trainer(cls, "2d", tmp_path, monkeypatch)
        with torch.device("meta"):
            net = trainer_fixtures.network_for(trainer)
        shapes[cls] = {k: tuple(v.shape) for k, v in net.state_dict().items() if k.startswith("encoder.")}
    stage1 = shapes[nnUNetTrainerM4oEPretrain]
    stage2 = {k: v for k, v in shapes[nnUNetTrainerM4oE].items() if ".mlp.gate." not in k}
    assert stage1 == stage2 and any(".mlp.experts.fc1_weight" in k and v[0] == 2 for k, v in stage1.items())
