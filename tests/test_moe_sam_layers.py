"""MoE-SAM's layers: adapters on SAM blocks, expert-choice MoE, feature enhancement, prompt generator."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Block

from nnunet_moe.layers.adapters import Adapter, attach_block_adapters
from nnunet_moe.layers.expert_choice import ExpertChoiceMoE
from nnunet_moe.layers.feature_enhancement import MoEFeatureEnhancement
from nnunet_moe.layers.prompt_generator import PromptEmbeddingGenerator


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_adapter_parameters_match_the_arithmetic():
    assert _count(Adapter(768, 0.25)) == 295_872  # 768*192 + 192 + 192*768 + 768


def test_adapters_keep_sam_block_keys_and_compute_the_msa_formula():
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=4, window_size=0, input_size=(4, 4))
    keys = set(block.state_dict())
    x = torch.randn(2, 4, 4, 32)
    before = block(x)
    attach_block_adapters(block, 32)
    assert keys <= set(block.state_dict())
    assert {k.split(".")[0] for k in set(block.state_dict()) - keys} == {"attn_adapter", "mlp_adapter"}
    torch.testing.assert_close(block(x), before)  # zero-initialised up projections: the block is unchanged
    for adapter in (block.attn_adapter, block.mlp_adapter):
        torch.nn.init.normal_(adapter.up.weight)

    def adapter(a, z):
        return a.up(F.gelu(a.down(z)))

    a = block.attn.forward(block.norm1(x))  # .forward: SAM's attention without the hook
    h = x + a + adapter(block.attn_adapter, a)  # the adapter with its skip on the attention branch
    z = block.norm2(h)
    expected = h + block.mlp.forward(z) + 0.5 * adapter(block.mlp_adapter, z)  # parallel MLP adapter, scaled 0.5
    torch.testing.assert_close(block(x), expected)
    with pytest.raises(ValueError, match="already has adapters"):
        attach_block_adapters(block, 32)


def _reference_expert_choice(moe, x):
    """Loop over groups and experts: eqs. (3)-(6) of the paper, written out."""
    g, n, d = x.shape
    k = moe.items_per_expert(n)
    out = torch.zeros_like(x)
    logits = moe.router(x)
    for gi in range(g):
        for e in range(moe.num_experts):
            top = logits[gi, :, e].topk(k)
            w = top.values.softmax(0)
            for weight, item in zip(w, top.indices):
                hidden = F.relu(x[gi, item] @ moe.experts.fc1_weight[e].t() + moe.experts.fc1_bias[e])
                out[gi, item] += weight * (hidden @ moe.experts.fc2_weight[e].t() + moe.experts.fc2_bias[e])
    return out


def test_expert_choice_each_expert_takes_the_top_half_and_matches_a_loop():
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(16, num_experts=4, hidden_dim=24, capacity=2.0).eval()
    assert moe.items_per_expert(12) == 6  # the paper: top half of the 12 layer features
    x = torch.randn(3, 12, 16)
    torch.testing.assert_close(moe(x), _reference_expert_choice(moe, x))


def test_expert_choice_noise_only_while_training_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(16, num_experts=4, hidden_dim=24)
    x = torch.randn(5, 12, 16)
    moe.eval()
    torch.testing.assert_close(moe(x), moe(x))
    moe.train()
    assert not torch.equal(moe(x), moe(x))
    moe(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.parameters())


def test_expert_choice_token_gating_and_bad_arguments():
    moe = ExpertChoiceMoE(8, num_experts=4, hidden_dim=8, gating="experts").eval()
    x = torch.randn(2, 40, 8)
    assert moe(x).shape == x.shape and moe.items_per_expert(40) == 20
    for kwargs, match in (({"capacity": 0}, "capacity"), ({"gating": "x"}, "gating"), ({"num_experts": 0}, "num_experts")):
        with pytest.raises(ValueError, match=match):
            ExpertChoiceMoE(8, **kwargs)
    with pytest.raises(ValueError, match="groups, items, dim"):
        moe(torch.randn(2, 8))


@pytest.mark.parametrize("routing", ["layers", "tokens"])
def test_feature_enhancement_shapes(routing):
    block = MoEFeatureEnhancement(dim=32, out_dim=16, hidden_dim=64, num_heads=8, routing=routing)
    out = block(torch.randn(2, 12, 3, 5, 32))
    assert out.shape == (2, 16, 3, 5)


def test_feature_enhancement_parameters_at_vit_b():
    block = MoEFeatureEnhancement()
    parts = {name: _count(m) for name, m in block.named_children()}
    assert parts == {"moe": 18_889_728 + 3_076 + 3_076, "norm": 1_536, "attn": 2_362_368, "neck": 787_456}
    assert _count(block) == 22_047_240
    with pytest.raises(ValueError, match="routing"):
        MoEFeatureEnhancement(routing="experts")


def test_prompt_generator():
    gen = PromptEmbeddingGenerator(256)
    assert _count(gen) == 8_976
    assert gen(torch.randn(3, 256, 4, 4)).shape == (3, 1, 256)
    with pytest.raises(ValueError, match="B, C, H, W"):
        gen(torch.randn(3, 256))
