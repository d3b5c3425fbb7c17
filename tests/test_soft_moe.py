"""SoftMoE (fused SDPA dispatch/combine) against a straightforward materialised reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_moe.layers.soft_moe import SoftMoE


def _rms(x, gamma):
    return F.normalize(x, dim=-1) * math.sqrt(x.shape[-1]) * gamma


def reference_soft_moe(layer: SoftMoE, x: torch.Tensor) -> torch.Tensor:
    """Textbook Soft MoE: materialise logits[b, n, e, s], two softmaxes, einsums, a loop over experts."""
    b, n, d = x.shape
    e = layer.num_experts
    if layer.slots == "dynamic":
        tokens = _rms(x, layer.token_norm.gamma)
        s = math.ceil(n / e)
        # average consecutive groups of e tokens; the last group is zero-padded
        padded = torch.cat([tokens, tokens.new_zeros(b, s * e - n, d)], dim=1)
        means = torch.stack([padded[:, i * e:(i + 1) * e].mean(dim=1) for i in range(s)], dim=1)  # b s d
        slot_embeds = (means @ layer.slot_proj.weight.t()).view(b, s, e, d)  # b s e d
        slot_embeds = _rms(slot_embeds, layer.slot_norm.gamma)
        logits = torch.einsum("bnd,bsed->bnes", tokens, slot_embeds)
        dispatched = tokens
    else:
        s = layer.slots_per_expert
        phi = layer.scale * F.normalize(layer.slot_embeddings, dim=0)  # d, e*s
        logits = torch.einsum("bnd,dm->bnm", F.normalize(x, dim=-1), phi).view(b, n, e, s)
        dispatched = x
    dispatch = torch.softmax(logits, dim=1)
    combine = torch.softmax(logits.reshape(b, n, e * s), dim=-1).view(b, n, e, s)
    slot_inputs = torch.einsum("bnes,bnd->besd", dispatch, dispatched)
    ex = layer.experts
    outs = []
    for i in range(e):
        h = F.gelu(slot_inputs[:, i] @ ex.fc1_weight[i].t() + ex.fc1_bias[i])
        outs.append(h @ ex.fc2_weight[i].t() + ex.fc2_bias[i])
    slot_outputs = torch.stack(outs, dim=1)  # b e s d
    return torch.einsum("bnes,besd->bnd", combine, slot_outputs)


def _randomise(layer: SoftMoE) -> None:
    # Perturb the ones-initialised scales so that the test sees every parameter act.
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("gamma") or name == "scale":
                p.add_(0.3 * torch.randn_like(p))


CASES = [
    # (slots, slots_per_expert, experts, tokens, dim)
    ("dynamic", None, 4, 37, 16),  # 37 tokens: not divisible by 4 experts
    ("dynamic", None, 4, 32, 16),
    ("dynamic", None, 8, 5, 8),  # fewer tokens than experts: one slot each
    ("learned", 2, 3, 29, 16),
    ("learned", 1, 4, 4, 12),
]


@pytest.mark.parametrize("slots,spe,experts,tokens,dim", CASES)
def test_forward_and_gradients_match_reference(slots, spe, experts, tokens, dim):
    torch.manual_seed(0)
    layer = SoftMoE(dim, experts, slots=slots, slots_per_expert=spe)
    _randomise(layer)
    x = torch.randn(2, tokens, dim, requires_grad=True)
    out = layer(x)
    ref = reference_soft_moe(layer, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    grad_out = torch.randn_like(out)
    params = [p for _, p in layer.named_parameters()]
    grads = torch.autograd.grad(out, [x] + params, grad_out)
    grads_ref = torch.autograd.grad(ref, [x] + params, grad_out)
    names = ["input"] + [n for n, _ in layer.named_parameters()]
    for name, g, gr in zip(names, grads, grads_ref):
        assert g is not None and gr is not None, name
        assert gr.abs().max() > 0, f"reference gradient of {name} is zero; the test would not see errors"
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_parameter_count_dynamic():
    d, e = 24, 5
    layer = SoftMoE(d, e)
    assert sum(p.numel() for p in layer.parameters()) == e * (8 * d * d + 5 * d) + e * d * d + 2 * d


def test_parameter_count_learned():
    d, e, s = 24, 5, 3
    layer = SoftMoE(d, e, slots="learned", slots_per_expert=s, mlp_ratio=2.0)
    assert sum(p.numel() for p in layer.parameters()) == e * (4 * d * d + 3 * d) + d * e * s + 1


def test_padding_tokens_get_no_dispatch_weight():
    # 5 tokens, 4 experts: the group means see 3 zero-padding rows, but the keys (what the dispatch
    # softmax runs over) are only the 5 real tokens, as in the reference where padding is never a key.
    torch.manual_seed(1)
    layer = SoftMoE(8, 4)
    x = torch.randn(1, 5, 8)
    keys, values, slots = layer.routing(x)
    assert keys.shape == (1, 5, 8) and values.shape == (1, 5, 8)
    assert slots.shape == (1, 8, 8)  # ceil(5/4)=2 slots per expert, 4 experts
    torch.testing.assert_close(layer(x), reference_soft_moe(layer, x), atol=1e-5, rtol=1e-5)


def test_spatial_input_is_flattened_to_tokens():
    torch.manual_seed(2)
    layer = SoftMoE(8, 4)
    x = torch.randn(2, 3, 4, 5, 8)
    out = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(2, 60, 8), layer(x.reshape(2, 60, 8)))


def test_upcycle_copies_dense_mlp_into_every_expert():
    from monai.networks.blocks import MLPBlock

    mlp = MLPBlock(hidden_size=8, mlp_dim=32, act="GELU", dropout_mode="swin")
    layer = SoftMoE(8, 3)
    layer.upcycle_from_dense(mlp)
    for e in range(3):
        torch.testing.assert_close(layer.experts.fc1_weight[e], mlp.linear1.weight, rtol=0, atol=0)
        torch.testing.assert_close(layer.experts.fc2_bias[e], mlp.linear2.bias, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dim": 8, "num_experts": 0}, "num_experts"),
        ({"dim": 8, "num_experts": -2}, "num_experts"),
        ({"dim": 8, "num_experts": 2, "slots": "learned", "slots_per_expert": 0}, "slots_per_expert"),
        ({"dim": 8, "num_experts": 2, "slots": "dynamic", "slots_per_expert": 2}, "dynamic"),
        ({"dim": 8, "num_experts": 2, "slots": "sparse"}, "slots must be one of"),
        ({"dim": 0, "num_experts": 2}, "dim"),
        ({"dim": 8, "num_experts": 2, "mlp_ratio": 0.0}, "mlp_ratio"),
        ({"dim": 8, "num_experts": 2, "dropout": 1.5}, "dropout"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftMoE(**kwargs)


def test_more_learned_slots_than_tokens_raises_unless_allowed():
    layer = SoftMoE(8, 4, slots="learned", slots_per_expert=2)
    with pytest.raises(ValueError, match="8 slots but the input has only 5 tokens"):
        layer(torch.randn(1, 5, 8))
    layer.allow_more_slots_than_tokens = True
    assert layer(torch.randn(1, 5, 8)).shape == (1, 5, 8)


def test_bad_input_shapes_raise():
    layer = SoftMoE(8, 2)
    with pytest.raises(ValueError, match="last dimension 7"):
        layer(torch.randn(1, 4, 7))
    with pytest.raises(ValueError, match=r"\(B, N, d\)"):
        layer(torch.randn(4, 8))
