"""M4oE Swin-Unet: exact parameter counts, structure, MONAI equivalence, deep supervision, gradients, errors."""
from types import SimpleNamespace

import pytest
import torch
from monai.networks.blocks import MLPBlock
from monai.networks.nets.swin_unetr import BasicLayer
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_moe.layers.m4oe import GATES, M4oE
from nnunet_moe.networks.m4oe import M4oESwinUnet, SwinStage
from nnunet_moe.training.patch_size import valid_patch_size


def n_params(module, part: str = "") -> int:
    return sum(p.numel() for name, p in module.named_parameters() if part in name)


def full_size(*args, **kwargs) -> M4oESwinUnet:
    """The full-size network on the meta device: shapes and parameter counts without memory or initialisation."""
    with torch.device("meta"):
        return M4oESwinUnet(*args, **kwargs)


def tiny(**kwargs) -> M4oESwinUnet:
    """Swin-Unet layout (4 stages, depth 2, window 7, patch 4) at width 12: cheap on CPU."""
    torch.manual_seed(0)
    return M4oESwinUnet(**{"in_channels": 2, "num_classes": 3, "embed_dim": 12, **kwargs})


# -- parameter counts (full size, 2D) ---------------------------------------------------------------------------
def test_authors_parameter_counts_3_channels_33_outputs():
    # The authors' model: 3 input channels, three bias-free heads 14 + 3 + 16 from 96 channels (= one 96 -> 33 head).
    plain = full_size(3, 33, num_experts=0)
    assert n_params(plain) == 27_171_204
    assert n_params(plain, ".mlp.") == 15_651_456  # the 14 dense MLPs
    assert n_params(plain) - n_params(plain, ".mlp.") == 11_519_748  # all but the MLPs
    theirs = full_size(3, 33, num_experts=3, gate="channels")
    assert n_params(theirs) == 60_432_132
    assert n_params(theirs, ".mlp.gate.") == 1_958_016  # 14 gates Linear(d, d)
    assert n_params(theirs) - n_params(theirs, ".mlp.") == 11_519_748  # the experts changed nothing else


def test_parameter_counts_9_classes_and_1_channel_14_classes():
    assert n_params(full_size(3, 9, num_experts=0)) == 27_168_900  # Swin-Unet on Synapse: one head 96 -> 9
    assert n_params(full_size(1, 14, num_experts=0)) == 27_166_308
    paper = full_size(1, 14, num_experts=2, gate="experts")
    assert n_params(paper) == 42_826_240
    assert n_params(paper, ".mlp.gate.") == 8_476  # 14 gates Linear(d, 2): the widths d sum to 4,224; 2 * 4,224 + 2 * 14
    # the paper's gate for 3 experts: 12,714; on one expert set 27,171,204 + 12,714 = 27.18 M, not the paper's 27.31 M
    assert n_params(full_size(3, 33, num_experts=3), ".mlp.gate.") == 12_714
    with_heads = full_size(1, 14, num_experts=2, deep_supervision=True)
    assert n_params(with_heads) - n_params(paper) == (96 + 192 + 384) * 14 + 3 * 14  # three 1x1 heads with bias


def test_meta_device_count_equals_the_real_count():
    kwargs = dict(in_channels=2, num_classes=3, embed_dim=12, num_experts=3, gate="modality", deep_supervision=True)
    assert n_params(full_size(**kwargs)) == n_params(M4oESwinUnet(**kwargs))


def test_moe_layers_in_every_block_and_one_expert_is_the_plain_swin_unet():
    net = tiny(num_experts=2)
    layers = net.moe_layers()
    enc = [f"encoder.stages.{s}.blocks.{b}.mlp" for s in range(4) for b in range(2)]
    dec = [f"decoder.stages.{s}.blocks.{b}.mlp" for s in range(3) for b in range(2)]
    assert list(layers) == enc + dec
    assert [m.dim for m in layers.values()] == [12, 12, 24, 24, 48, 48, 96, 96, 48, 48, 24, 24, 12, 12]
    assert {m.num_experts for m in layers.values()} == {2}
    for experts in (0, 1):
        plain = tiny(num_experts=experts)
        assert plain.moe_layers() == {} and plain.num_experts == 0 and plain.gate is None
        assert isinstance(plain.encoder.stages[0].blocks[0].mlp, MLPBlock)
    assert set(tiny(num_experts=1).state_dict()) == set(tiny(num_experts=0).state_dict())


def test_swin_init_truncated_normal_everywhere():
    net = tiny(num_experts=2, init="swin")
    layer = net.moe_layers()["encoder.stages.0.blocks.0.mlp"]
    for weight in (layer.experts.fc1_weight, layer.experts.fc2_weight, net.encoder.stages[0].blocks[0].attn.qkv.weight,
                   net.decoder.fuse[0].weight):
        assert 0.015 < weight.std() < 0.025  # std 0.02 (PyTorch's default for a 12-wide Linear: 0.17)
    assert layer.experts.fc1_bias.abs().max() == 0 and net.decoder.fuse[0].bias.abs().max() == 0
    assert tiny(num_experts=2, init="pytorch").decoder.fuse[0].bias.abs().max() > 0


# -- the stage equals MONAI's own forward ----------------------------------------------------------------------
@pytest.mark.parametrize("size", [(14, 21), (8, 8), (5, 3)])  # whole windows; padded; window shrunk, no shift
def test_dense_stage_equals_monai_basic_layer(size):
    torch.manual_seed(0)
    monai_layer = BasicLayer(12, 2, 3, (7, 7), [0.0, 0.0], qkv_bias=True).eval()
    stage = SwinStage(12, 2, 3, (7, 7), [0.0, 0.0], num_experts=0, gate="experts", mlp_ratio=4.0, qkv_bias=True,
                      drop=0.0, attn_drop=0.0, expert_dropout=0.0).eval()
    stage.load_state_dict(monai_layer.state_dict(), strict=True)
    x = torch.randn(2, 12, *size)
    torch.testing.assert_close(stage(x.movedim(1, -1)), monai_layer(x).movedim(1, -1), rtol=0, atol=0)


# -- shapes, deep supervision ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", [(64, 32), (32, 32, 32)])
def test_forward_shapes_and_deep_supervision_switch(spatial):
    net = tiny(num_experts=2, spatial_dims=len(spatial), deep_supervision=True).eval()
    x = torch.randn(1, 2, *spatial)
    outs = net(x)
    factors = M4oESwinUnet.deep_supervision_factors()
    assert factors == (1, 4, 8, 16)
    assert [tuple(o.shape) for o in outs] == [(1, 3, *(s // f for s in spatial)) for f in factors]
    nnUNetTrainer.set_deep_supervision_enabled(SimpleNamespace(is_ddp=False, network=net), False)  # nnU-Net's own
    assert net.decoder.deep_supervision is False
    single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (1, 3, *spatial)
    torch.testing.assert_close(single, outs[0], rtol=0, atol=0)


def test_deep_supervision_needs_the_heads():
    net = tiny(num_experts=2)
    assert net.decoder.heads is None and isinstance(net(torch.randn(1, 2, 32, 32)), torch.Tensor)
    with pytest.raises(ValueError, match="built with deep_supervision=False and has no deep-supervision heads; "
                                         "construct it with deep_supervision=True"):
        net.decoder.deep_supervision = True


@pytest.mark.parametrize("gate", GATES)
def test_batch_equals_one_by_one(gate):
    net = tiny(num_experts=3, gate=gate, deep_supervision=True).eval()
    x, modality = torch.randn(3, 2, 32, 64), torch.tensor([2, 0, 1])
    batched = net(x, modality)
    for i in range(3):
        single = net(x[i:i + 1], modality[i:i + 1])
        for b, s in zip(batched, single):
            torch.testing.assert_close(b[i:i + 1], s, rtol=1e-5, atol=1e-5)


def test_modality_reaches_every_layer():
    # one-hot gates: swapping the two experts' weights in every layer and the modality gives the same output
    net = tiny(num_experts=2, gate="onehot").eval()
    x = torch.randn(2, 2, 32, 32)
    out = net(x, torch.tensor([0, 1]))
    assert not torch.allclose(out, net(x, torch.tensor([1, 0])))
    with torch.no_grad():
        for layer in net.moe_layers().values():
            for p in layer.experts.parameters():
                p.copy_(p.flip(0))
    torch.testing.assert_close(net(x, torch.tensor([1, 0])), out, rtol=1e-5, atol=1e-5)


def test_encoder_halves_for_masked_pretraining():
    net = tiny(num_experts=2, gate="onehot").eval()
    x, modality = torch.randn(2, 2, 64, 32), torch.tensor([1, 0])
    tokens = net.encoder.embed(x)
    assert tokens.shape == (2, 16, 8, 12)  # channels-last patch tokens, patch 4
    bottleneck, skips = net.encoder.encode_tokens(tokens, modality)
    assert bottleneck.shape == (2, 2, 1, 96)
    assert [tuple(s.shape) for s in skips] == [(2, 16, 8, 12), (2, 8, 4, 24), (2, 4, 2, 48)]
    assert torch.equal(skips[0], tokens)  # Swin-Unet's first skip is the patch embedding itself
    assert torch.equal(net.encoder(x, modality)[0], bottleneck)


@pytest.mark.parametrize("gate", GATES)
def test_train_step_gives_every_parameter_a_gradient(gate):
    # DDP without find_unused_parameters needs every parameter in the graph of each step.
    net = tiny(num_experts=2, gate=gate, deep_supervision=True, drop_path_rate=0.1).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    target = torch.randint(0, 3, (2, 32, 64))
    outs = net(torch.randn(2, 2, 32, 64), torch.tensor([0, 1]))
    loss = sum(torch.nn.functional.cross_entropy(o, target[:, ::f, ::f]) for o, f in zip(outs, (1, 4, 8, 16)))
    loss.backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    before = net.encoder.stages[3].blocks[1].mlp.experts.fc1_weight.clone()
    opt.step()
    assert not torch.equal(before, net.encoder.stages[3].blocks[1].mlp.experts.fc1_weight)


# -- input rules and errors -------------------------------------------------------------------------------------
def test_input_divisor_and_patch_size_rule():
    assert M4oESwinUnet.input_divisor() == 32  # patch 4 x 2^3 merges; the window (7) is padded, not required
    assert valid_patch_size([56, 40], M4oESwinUnet.input_divisor()) == [64, 32]
    assert tiny(num_experts=0)(torch.randn(1, 2, 96, 32)).shape == (1, 3, 96, 32)  # 24x8 tokens: not windows of 7


def test_bad_input_size_names_the_size_and_the_rule():
    net = tiny(num_experts=2)
    with pytest.raises(ValueError, match=r"M4oESwinUnet \(patch 4 x 2\^3 patch merges\): spatial shape \(40, 64\) "
                                         r"is not supported; every spatial size must be divisible by 32 \(the total "
                                         r"down-sampling of the network\), e.g. \(32, 64\)"):
        net(torch.randn(1, 2, 40, 64))
    with pytest.raises(ValueError, match=r"M4oESwinUnet\(in_channels=2\) got an input with 1 channels"):
        net(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expects a 4D input \(B, C, H, W\), got shape \(1, 2, 32, 32, 32\)"):
        net(torch.randn(1, 2, 32, 32, 32))


def test_modality_gates_need_the_modality():
    with pytest.raises(ValueError, match=r"gate='onehot' needs the modality of every sample"):
        tiny(num_experts=2, gate="onehot")(torch.randn(1, 2, 32, 32))
    out = tiny(num_experts=2, gate="experts")(torch.randn(1, 2, 32, 32))  # the paper's gate reads only x
    assert out.shape == (1, 3, 32, 32)


def test_bad_configuration():
    with pytest.raises(ValueError, match="gate must be one of experts, channels, modality, onehot, got 'dataset'"):
        tiny(gate="dataset")
    with pytest.raises(ValueError, match=r"decoder_depths with one fewer, got depths=\(2, 2, 2, 2\), "
                                         r"num_heads=\(3, 6, 12, 24\), decoder_depths=\(2, 2, 2, 1\)"):
        tiny(decoder_depths=(2, 2, 2, 1))
    with pytest.raises(ValueError, match=r"stage widths \[10, 20, 40, 80\] must be divisible by num_heads"):
        tiny(embed_dim=10)
    with pytest.raises(ValueError, match="num_experts must be an integer >= 0"):
        tiny(num_experts=-1)
    assert isinstance(tiny(num_experts=2).moe_layers()["decoder.stages.2.blocks.1.mlp"], M4oE)


def test_modality_keyword_hands_the_modality_to_plain_calls_and_goes_away():
    from nnunet_moe.networks.modality_keyword import ModalityKeyword

    class Echo(torch.nn.Module):
        def forward(self, x, modality=None):
            return modality

    net = Echo()
    keyword = ModalityKeyword(net)
    keyword.set(None)
    assert net(torch.zeros(2, 1)) is None and not net._forward_pre_hooks  # no hook until a modality is set
    keyword.set(1)
    assert net(torch.zeros(3, 1)).tolist() == [1, 1, 1]  # one index: every sample of any batch
    keyword.set(torch.tensor([0, 1]))
    assert net(torch.zeros(2, 1)).tolist() == [0, 1]
    assert net(torch.zeros(2, 1), modality="given") == "given"  # an explicit modality wins
    keyword.remove()
    assert net(torch.zeros(2, 1)) is None and not net._forward_pre_hooks
