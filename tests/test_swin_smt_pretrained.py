"""Loading SwinUNETR checkpoints (self-supervised encoder and full network layouts) into Swin SMT."""
import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR

from nnunet_moe.networks.swin_smt import SwinSMT
from nnunet_moe.pretrained.swin_unetr_weights import load_swin_unetr_weights

FS = 12  # tiny feature size: dims 12/24/48/96


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=3, feature_size=FS).eval()


def _ssl_state_dict(dense_net):
    """The layout of MONAI's self-supervised model_swinvit.pt: encoder keys under 'module.', MLP as fc1/fc2."""
    sd = {}
    for k, v in dense_net.swinViT.state_dict().items():
        sd["module." + k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2")] = v.clone()
    # pretraining heads that a segmentation network does not have
    sd["module.rotation_head.weight"] = torch.randn(4, 8 * FS)
    sd["module.contrastive_head.weight"] = torch.randn(16, 8 * FS)
    return sd


def _materialised_soft_moe_with_dense_expert(moe, mlp, x):
    """Dynamic-slot Soft MoE with every expert replaced by the dense MLP, logits materialised."""
    b, n, d = x.shape
    e = moe.num_experts
    s = math.ceil(n / e)
    tokens = F.normalize(x, dim=-1) * math.sqrt(d) * moe.token_norm.gamma
    padded = torch.cat([tokens, tokens.new_zeros(b, s * e - n, d)], 1)
    slot_emb = moe.slot_proj(padded.view(b, s, e, d).mean(2)).view(b, s, e, d)
    slot_emb = F.normalize(slot_emb, dim=-1) * math.sqrt(d) * moe.slot_norm.gamma
    logits = torch.einsum("bnd,bsed->bnes", tokens, slot_emb)
    slot_in = torch.einsum("bnes,bnd->besd", logits.softmax(dim=1), tokens)
    combine = logits.reshape(b, n, -1).softmax(-1).view(b, n, e, s)
    return torch.einsum("bnes,besd->bnd", combine, mlp(slot_in))


def test_self_supervised_encoder_layout_upcycles_experts(dense, tmp_path):
    path = tmp_path / "model_swinvit.pt"
    ssl = _ssl_state_dict(dense)
    torch.save({"state_dict": ssl, "epoch": 100}, path)
    torch.manual_seed(1)
    net = SwinSMT(in_channels=1, out_channels=3, feature_size=FS, num_experts=3)
    report = load_swin_unetr_weights(net, path, verbose=False)

    assert report.layout == "self-supervised Swin encoder"
    assert sorted(report.unexpected) == ["module.contrastive_head.weight", "module.rotation_head.weight"]
    assert len(report.upcycled) == 6 * 4  # 6 MoE blocks x (fc1/fc2 weight/bias)
    # everything of the encoder except the MoE blocks' dense MLPs is loaded one to one
    dense_mlp_keys = [k for k in ssl if any(f"layers{s}.0.blocks.{b}.mlp." in k for s in (2, 3, 4) for b in (0, 1))]
    assert len(report.loaded) == len(ssl) - 2 - len(dense_mlp_keys)
    router = [k for k in report.missing if ".mlp." in k]
    assert len(router) == 6 * 3 and all(k.endswith(("slot_proj.weight", "token_norm.gamma", "slot_norm.gamma")) for k in router)
    assert not any(k.startswith("swinViT.") and ".mlp." not in k for k in report.missing)

    state = net.state_dict()
    for key, value in dense.swinViT.state_dict().items():
        if ".mlp." in key and not key.startswith("layers1."):
            continue
        torch.testing.assert_close(state["swinViT." + key], value, rtol=0, atol=0)
    for stage in (1, 2, 3):
        for blk, dense_blk in zip(net.swin_stage(stage).blocks, dense.swinViT.__getattr__(f"layers{stage + 1}")[0].blocks):
            for e in range(3):
                torch.testing.assert_close(blk.mlp.experts.fc1_weight[e], dense_blk.mlp.linear1.weight, rtol=0, atol=0)
                torch.testing.assert_close(blk.mlp.experts.fc1_bias[e], dense_blk.mlp.linear1.bias, rtol=0, atol=0)
                torch.testing.assert_close(blk.mlp.experts.fc2_weight[e], dense_blk.mlp.linear2.weight, rtol=0, atol=0)
                torch.testing.assert_close(blk.mlp.experts.fc2_bias[e], dense_blk.mlp.linear2.bias, rtol=0, atol=0)


def test_upcycled_block_equals_dense_mlp_on_slot_mixture_not_dense_output(dense, tmp_path):
    """With identical experts f the Soft MoE output is sum_slots C f(D^T x~): f applied to slot mixtures of the
    normalised tokens, recombined. f is nonlinear and the tokens are RMS-normalised, so this is not f(x)."""
    path = tmp_path / "ssl.pt"
    torch.save({"state_dict": _ssl_state_dict(dense)}, path)
    torch.manual_seed(2)
    net = SwinSMT(in_channels=1, out_channels=3, feature_size=FS, num_experts=4)
    load_swin_unetr_weights(net, path, verbose=False)
    moe = net.swin_stage(2).blocks[1].mlp
    dense_mlp = dense.swinViT.layers3[0].blocks[1].mlp
    x = torch.randn(2, 27, 4 * FS)  # 27 tokens: not divisible by 4 experts
    with torch.no_grad():
        out = moe(x)
        torch.testing.assert_close(out, _materialised_soft_moe_with_dense_expert(moe, dense_mlp, x), atol=1e-5, rtol=1e-5)
        assert (out - dense_mlp(x)).abs().max() > 1e-2


def test_full_layout_nnunet_wrapped_loads_exactly(dense, tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"_orig_mod." + k: v for k, v in dense.state_dict().items()}}, path)
    net = SwinSMT(in_channels=1, out_channels=3, feature_size=FS, num_experts=0).eval()
    report = load_swin_unetr_weights(net, path, verbose=False)
    assert report.layout == "full network"
    assert len(report.loaded) == len(dense.state_dict())
    assert not report.missing and not report.unexpected and not report.upcycled
    net_state = net.state_dict()
    for key, value in dense.state_dict().items():  # equal weights: the forward equivalence is in test_swin_smt_network
        torch.testing.assert_close(net_state[key], value, rtol=0, atol=0)

    # same checkpoint into an MoE network with deep-supervision heads: experts upcycled, decoder loaded
    moe_net = SwinSMT(in_channels=1, out_channels=3, feature_size=FS, num_experts=2, deep_supervision=True)
    report = load_swin_unetr_weights(moe_net, path, verbose=False)
    assert len(report.upcycled) == 24 and not report.unexpected
    assert len(report.missing) == 6 * 3 + 4 * 2  # router parameters + 4 heads (weight, bias)
    torch.testing.assert_close(moe_net.decoder1.transp_conv.conv.weight, dense.decoder1.transp_conv.conv.weight, rtol=0, atol=0)


def test_full_swin_smt_checkpoint_with_old_head_names_loads_the_heads(tmp_path):
    torch.manual_seed(0)
    trained = SwinSMT(in_channels=1, out_channels=3, feature_size=FS, num_experts=2, deep_supervision=True)
    old = {k.replace("decoder.heads.", "deep_supervision_heads."): v for k, v in trained.state_dict().items()}
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": old}, path)
    net = SwinSMT(in_channels=1, out_channels=3, feature_size=FS, num_experts=2, deep_supervision=True)
    report = load_swin_unetr_weights(net, path, verbose=False)
    assert len(report.loaded) == len(old) and not report.missing and not report.unexpected
    torch.testing.assert_close(net.decoder.heads[3].conv.conv.weight, trained.decoder.heads[3].conv.conv.weight,
                               rtol=0, atol=0)


def test_missing_file_raises(tmp_path):
    net = SwinSMT(in_channels=1, out_channels=3, feature_size=FS, num_experts=0)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_swin_unetr_weights(net, tmp_path / "nope.pt")


def test_corrupt_file_raises_clear_error(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    net = SwinSMT(in_channels=1, out_channels=3, feature_size=FS, num_experts=0)
    with pytest.raises(ValueError, match=r"corrupt\.pt.*not a readable PyTorch checkpoint.*torch\.save"):
        load_swin_unetr_weights(net, path)


def test_non_state_dict_content_raises(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    net = SwinSMT(in_channels=1, out_channels=3, feature_size=FS, num_experts=0)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_swin_unetr_weights(net, path)


def test_other_architecture_raises(tmp_path):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    unet = PlainConvUNet(1, 3, (8, 16, 32), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 2, (1, 1), False,
                         torch.nn.InstanceNorm3d, None, None, None, torch.nn.LeakyReLU)
    path = tmp_path / "plain_unet.pth"
    torch.save({"network_weights": unet.state_dict()}, path)
    net = SwinSMT(in_channels=1, out_channels=3, feature_size=FS, num_experts=2)
    with pytest.raises(ValueError, match=r"plain_unet\.pth.*no tensor in common.*another architecture"):
        load_swin_unetr_weights(net, path)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    torch.manual_seed(0)
    wide = SwinUNETR(in_channels=1, out_channels=3, feature_size=24)
    path = tmp_path / "wide.pt"
    torch.save(wide.state_dict(), path)
    net = SwinSMT(in_channels=1, out_channels=3, feature_size=FS, num_experts=2)
    with pytest.raises(ValueError, match=r"'swinViT\.patch_embed\.proj\.weight' has shape \(24, 1, 2, 2, 2\).*\(12, 1, 2, 2, 2\)"):
        load_swin_unetr_weights(net, path)

    # another class count: skip the mismatching head, load the rest
    other_classes = SwinUNETR(in_channels=1, out_channels=5, feature_size=FS)
    torch.save({"state_dict": other_classes.state_dict()}, path)
    report = load_swin_unetr_weights(net, path, skip_mismatched=True, verbose=False)
    assert list(report.skipped) == ["out.conv.conv.weight", "out.conv.conv.bias"]
    torch.testing.assert_close(net.encoder1.layer.conv1.conv.weight, other_classes.encoder1.layer.conv1.conv.weight)


def test_pickled_objects_need_trust(tmp_path):
    import numpy as np

    path = tmp_path / "nnunet_like.pth"
    dense = SwinUNETR(in_channels=1, out_channels=3, feature_size=FS)
    torch.save({"network_weights": dense.state_dict(), "logging": {"ema": [np.float64(0.5)]}}, path)
    net = SwinSMT(in_channels=1, out_channels=3, feature_size=FS, num_experts=0)
    with pytest.raises(ValueError, match="trust_checkpoint=True"):
        load_swin_unetr_weights(net, path)
    report = load_swin_unetr_weights(net, path, trust_checkpoint=True, verbose=False)
    assert len(report.loaded) == len(dense.state_dict())
