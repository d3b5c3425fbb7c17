"""VMamba-Tiny checkpoint loading into the Swin-UMamba encoders: weights, report counts, adaptation, errors."""
import pytest
import torch

from nnunet_moe.networks.swin_umamba import SwinUMamba, SwinUMambaD, VSSEncoder
from nnunet_moe.pretrained.vmamba_weights import load_vmamba_encoder_weights, loaded_encoder_parameters

DIMS = dict(dims=(8, 16, 32, 64), depths=(1, 1, 2, 1))


def write_vmamba_checkpoint(path, seed=0, prefix=""):
    """A VMamba-Tiny-layout checkpoint: RGB patch-4 embedding, stages, classifier head and final norm."""
    torch.manual_seed(seed)
    source = VSSEncoder(in_channels=3, patch_size=4, spatial_dims=2, **DIMS)
    for p in source.parameters():  # distinct values so a wrong or missing copy is visible
        torch.nn.init.normal_(p)
    state = {prefix + k: v.clone() for k, v in source.state_dict().items()}
    state.update({"norm.weight": torch.ones(64), "norm.bias": torch.zeros(64),
                  "head.weight": torch.randn(1000, 64), "head.bias": torch.zeros(1000)})
    torch.save({"model": state, "epoch": 292}, path)
    return source.state_dict()


def test_load_into_dagger_adapts_rgb_patch_embedding(tmp_path):
    path = tmp_path / "vssmtiny.pth"
    source = write_vmamba_checkpoint(path)
    net = SwinUMambaD(in_channels=1, num_classes=3, spatial_dims=2, decoder_depths=(1, 1, 1), **DIMS)
    report = load_vmamba_encoder_weights(net, path)
    target = net.encoder.state_dict()
    n_keys = len(target)
    assert len(report.loaded) == n_keys and report.missing == [] and report.unexpected == [] and report.skipped == {}
    assert sorted(report.dropped) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert list(report.adapted) == ["patch_embed.proj.weight"]
    for key, value in source.items():
        if key != "patch_embed.proj.weight":
            assert torch.equal(target[key], value), key
    # 1 input channel: RGB kernels summed, so a grey image gives the RGB model's response
    torch.testing.assert_close(target["patch_embed.proj.weight"], source["patch_embed.proj.weight"].sum(1, keepdim=True))


def test_load_into_swin_umamba_skips_mismatched_patch_embedding(tmp_path):
    path = tmp_path / "vssmtiny.pth"
    source = write_vmamba_checkpoint(path, prefix="module.")  # DDP prefix is stripped
    net = SwinUMamba(in_channels=1, num_classes=3, spatial_dims=2, stem_channels=8, **DIMS)
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    report = load_vmamba_encoder_weights(net.encoder, path)
    assert set(report.skipped) == {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert report.missing == ["patch_embed.proj.bias", "patch_embed.proj.weight"]
    assert len(report.loaded) == len(before) - 2 and report.unexpected == [] and len(report.dropped) == 4
    after = net.encoder.state_dict()
    assert torch.equal(after["patch_embed.proj.weight"], before["patch_embed.proj.weight"])  # untouched
    assert torch.equal(after["patch_embed.norm.weight"], source["patch_embed.norm.weight"])
    assert torch.equal(after["layers.2.blocks.1.self_attention.A_logs"], source["layers.2.blocks.1.self_attention.A_logs"])
    assert torch.equal(after["layers.0.downsample.reduction.weight"], source["layers.0.downsample.reduction.weight"])
    assert "summary" in dir(report) and "loaded" in report.summary()


def test_3d_network_reports_shape_mismatches_instead_of_failing(tmp_path):
    path = tmp_path / "vssmtiny.pth"
    write_vmamba_checkpoint(path)
    net = SwinUMambaD(in_channels=1, num_classes=2, spatial_dims=3, decoder_depths=(1, 1, 1), **DIMS)
    report = load_vmamba_encoder_weights(net, path)
    assert "layers.0.blocks.0.self_attention.x_proj_weight" in report.skipped  # 4 vs 6 directions
    assert "layers.0.blocks.0.self_attention.conv2d.weight" in report.unexpected
    assert "layers.0.blocks.0.self_attention.conv3d.weight" in report.missing
    assert "layers.0.blocks.0.ln_1.weight" in report.loaded


def test_corrupt_file_raises_clear_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"<html>404 not found</html>" * 10)
    net = SwinUMambaD(1, 2, decoder_depths=(1, 1, 1), **DIMS)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_vmamba_encoder_weights(net, path)
    with pytest.raises(FileNotFoundError):
        load_vmamba_encoder_weights(net, tmp_path / "absent.pth")


def test_checkpoint_of_another_model_raises_clear_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"model": torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict()}, path)
    net = SwinUMambaD(1, 2, decoder_depths=(1, 1, 1), **DIMS)
    with pytest.raises(ValueError, match="no VMamba encoder keys"):
        load_vmamba_encoder_weights(net, path)
    with pytest.raises(TypeError, match="VSSEncoder"):
        load_vmamba_encoder_weights(torch.nn.Linear(2, 2), path)


def test_2d_freezes_the_whole_encoder_but_the_patch_embedding(tmp_path):
    path = tmp_path / "vssmtiny.pth"
    write_vmamba_checkpoint(path)
    net = SwinUMamba(1, 2, stem_channels=8, **DIMS)
    frozen = loaded_encoder_parameters(net, load_vmamba_encoder_weights(net, path))
    assert {id(p) for p in frozen.values()} == {id(p) for p in net.encoder.layers.parameters()}
    assert not any(name.startswith("patch_embed.") for name in frozen)  # the paper trains it from the start


def test_3d_freezes_only_what_the_checkpoint_filled(tmp_path):
    """3D: scan projections, dt, A, D, conv3d and the patch mergings have other shapes than VMamba's 2D ones;
    they stay at their initialisation, so they must not be frozen."""
    path = tmp_path / "vssmtiny.pth"
    source = write_vmamba_checkpoint(path)
    net = SwinUMambaD(in_channels=1, num_classes=2, spatial_dims=3, decoder_depths=(1, 1, 1), **DIMS)
    report = load_vmamba_encoder_weights(net, path)
    frozen = loaded_encoder_parameters(net, report)
    for name, p in net.encoder.named_parameters():
        from_checkpoint = name in source and source[name].shape == p.shape and torch.equal(source[name], p.detach())
        assert (name in frozen) == (from_checkpoint and not name.startswith("patch_embed.")), name
    assert frozen and "layers.0.blocks.0.self_attention.x_proj_weight" not in frozen
    assert "layers.0.blocks.0.self_attention.A_logs" not in frozen and "layers.0.downsample.reduction.weight" \
        not in frozen
    assert not any(k in frozen for k in report.skipped) and not any(k in frozen for k in report.missing)


def test_both_loaders_report_in_one_shape_with_reasons(tmp_path):
    from nnunet_moe.networks.swin_smt import SwinSMT
    from nnunet_moe.pretrained.load_report import LoadReport
    from nnunet_moe.pretrained.swin_unetr_weights import load_swin_unetr_weights

    path = tmp_path / "vssmtiny.pth"
    write_vmamba_checkpoint(path)
    report = load_vmamba_encoder_weights(SwinUMamba(1, 3, stem_channels=8, **DIMS), path)
    assert isinstance(report, LoadReport) and report.checkpoint == str(path)
    text = report.summary(max_names=None)
    assert text.startswith("Loaded vssmtiny.pth (VMamba encoder layout): 76 tensors loaded, 2 skipped, 4 dropped, "
                           "2 missing, 0 unexpected")
    assert "patch_embed.proj.weight (shape (8, 3, 4, 4) in checkpoint, (8, 8, 2, 2) in encoder)" in text
    assert "dropped (not used by this network): 4 [" in text and "head.weight" in text

    swin = SwinSMT(in_channels=1, out_channels=3, feature_size=12, num_experts=0)
    swin_path = tmp_path / "swin.pt"
    torch.save(swin.state_dict(), swin_path)
    assert type(load_swin_unetr_weights(swin, swin_path, verbose=False)) is LoadReport
