"""Swin-UMamba's ``init`` option: the authors' initialisation has the documented statistics, the default
is unchanged, and pretrained weights still replace the encoder."""
import pytest
import torch
from torch import nn

from nnunet_moe.networks.swin_umamba import INIT_ENV, SwinUMamba, SwinUMambaD
from nnunet_moe.pretrained.vmamba_weights import load_vmamba_encoder_weights

DIMS = dict(dims=(8, 16, 32, 64), depths=(1, 1, 2, 1))
CONVS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def build(cls, init, seed=0, spatial_dims=2):
    torch.manual_seed(seed)
    extra = dict(stem_channels=8) if cls is SwinUMamba else dict(decoder_depths=(1, 1, 1))
    return cls(in_channels=1, num_classes=3, spatial_dims=spatial_dims, init=init, **DIMS, **extra)


def modules(net, kinds):
    return [m for m in net.modules() if isinstance(m, kinds)]


def assert_vmamba_encoder_init(encoder):
    linears = modules(encoder, nn.Linear)
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert len(linears) > 5 and weights.numel() > 5000
    assert weights.std().item() == pytest.approx(0.02, rel=0.05) and abs(weights.mean().item()) < 2e-3
    assert all(m.bias is None or not m.bias.any() for m in linears)
    for norm in modules(encoder, nn.LayerNorm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()


@pytest.mark.parametrize("cls", [SwinUMamba, SwinUMambaD])
def test_authors_init_gives_vmamba_statistics_in_the_encoder(cls):
    authors, default = build(cls, "authors"), build(cls, "pytorch")
    assert_vmamba_encoder_init(authors.encoder)
    # PyTorch's default is not that (so the check above would catch a missing init)
    default_weights = torch.cat([m.weight.detach().flatten() for m in modules(default.encoder, nn.Linear)])
    assert default_weights.std().item() > 0.03
    # the selective-scan parameters keep Mamba's initialisation (VMamba's init only touches Linear/LayerNorm)
    d_auth, d_def = authors.state_dict(), default.state_dict()
    for key in d_def:
        if key.endswith(("A_logs", "Ds", "dt_projs_bias", "dt_projs_weight", "x_proj_weight")):
            assert torch.equal(d_auth[key], d_def[key]), key


def test_swin_umamba_authors_init_leaves_stem_and_decoder_as_pytorch():
    """The authors' SwinUMamba initialises only its VSSM encoder: same seed, same stem and decoder."""
    authors, default = build(SwinUMamba, "authors"), build(SwinUMamba, "pytorch")
    d_auth, d_def = authors.state_dict(), default.state_dict()
    others = [k for k in d_def if not k.startswith("encoder.")]
    assert others and all(torch.equal(d_auth[k], d_def[k]) for k in others)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_dagger_authors_init_is_he_on_every_convolution(spatial_dims):
    net = build(SwinUMambaD, "authors", spatial_dims=spatial_dims)
    convs = modules(net, CONVS)
    assert len(convs) >= 5  # patch embedding, depthwise scan convs (encoder and decoder), heads
    # Kaiming normal, a = 0.01, fan_in: std = sqrt(2 / (1 + a^2) / fan_in); pooled after scaling to 1
    scaled = []
    for conv in convs:
        fan_in = conv.weight[0].numel()
        scaled.append(conv.weight.detach().flatten() / (2.0 / (1 + 1e-4) / fan_in) ** 0.5)
        assert conv.bias is None or not conv.bias.any()
    scaled = torch.cat(scaled)
    assert scaled.std().item() == pytest.approx(1.0, rel=0.05) and abs(scaled.mean().item()) < 0.05
    assert_vmamba_encoder_init(net.encoder)  # the encoder's Linear/LayerNorm init is kept
    default_convs = modules(build(SwinUMambaD, "pytorch", spatial_dims=spatial_dims), CONVS)
    assert any(c.bias is not None and c.bias.any() for c in default_convs)  # PyTorch's biases are not zero


def test_default_is_pytorch_and_the_environment_selects(monkeypatch):
    monkeypatch.delenv(INIT_ENV, raising=False)
    assert build(SwinUMambaD, None).init == "pytorch"
    monkeypatch.setenv(INIT_ENV, "authors")
    net = build(SwinUMambaD, None)
    assert net.init == "authors"
    assert_vmamba_encoder_init(net.encoder)
    assert build(SwinUMambaD, "pytorch").init == "pytorch"  # an explicit argument wins
    monkeypatch.setenv(INIT_ENV, "xavier")
    with pytest.raises(ValueError, match=f"{INIT_ENV}='xavier'.*pytorch, authors"):
        build(SwinUMamba, None)
    with pytest.raises(ValueError, match="init='kaiming'"):
        build(SwinUMamba, "kaiming")


@pytest.mark.parametrize("cls", [SwinUMamba, SwinUMambaD])
def test_pretrained_weights_replace_the_authors_init(cls, tmp_path):
    """A checkpoint in the VMamba layout (values far from any init) loads over the authors' init unchanged."""
    source = build(cls, "pytorch", seed=1).encoder
    for p in source.parameters():
        nn.init.normal_(p)
    path = tmp_path / "vssmtiny.pth"
    torch.save({"model": source.state_dict()}, path)
    net = build(cls, "authors")
    report = load_vmamba_encoder_weights(net, path)
    loaded = net.encoder.state_dict()
    assert sorted(report.loaded) == sorted(loaded)
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())


def test_trainers_build_with_the_default_init(tmp_path, monkeypatch):
    """No trainer passes ``init``: the pretrained and scratch trainers keep PyTorch's init until a default is chosen."""
    from nnunet_moe.training.swin_umamba_trainer import nnUNetTrainerSwinUMamba, nnUNetTrainerSwinUMambaDScratch
    from trainer_fixtures import make_trainer, network_for

    monkeypatch.delenv(INIT_ENV, raising=False)
    for cls in (nnUNetTrainerSwinUMamba, nnUNetTrainerSwinUMambaDScratch):
        assert network_for(make_trainer(cls, "2d", tmp_path, monkeypatch)).init == "pytorch"
