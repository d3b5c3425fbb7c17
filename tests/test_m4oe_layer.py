"""M4oE layer: gate weights, each gate against a reference computation, batch independence, gradients, errors."""
import pytest
import torch
import torch.nn.functional as F

from nnunet_moe.layers.m4oe import GATES, M4oE

DIM, EXPERTS = 8, 3


def expert_ref(layer: M4oE, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` as two nn.Linear layers with GELU (paper Eq. 2)."""
    ex = layer.experts
    return F.linear(F.gelu(F.linear(x, ex.fc1_weight[e], ex.fc1_bias[e])), ex.fc2_weight[e], ex.fc2_bias[e])


def reference(layer: M4oE, x: torch.Tensor, modality=None) -> torch.Tensor:
    """Textbook M4oE on (B, N, d): a loop over experts, the gate written out."""
    outs = torch.stack([expert_ref(layer, e, x) for e in range(layer.num_experts)], dim=-2)  # B N E d
    if layer.gate_type == "channels":
        w = torch.softmax(x @ layer.gate.weight.t() + layer.gate.bias, dim=-1)  # over the d channels
        return w * outs.sum(dim=-2)
    if layer.gate_type == "onehot":
        g = F.one_hot(modality, layer.num_experts).float()[:, None, :].expand(x.shape[0], x.shape[1], -1)
    else:
        logits = x @ layer.gate.weight.t() + layer.gate.bias
        if layer.gate_type == "modality":
            logits = logits + layer.modality_bias[modality][:, None, :]
        g = torch.softmax(logits, dim=-1)  # over experts
    return (g.unsqueeze(-1) * outs).sum(dim=-2)


def make(gate: str, seed: int = 0) -> M4oE:
    torch.manual_seed(seed)
    layer = M4oE(DIM, EXPERTS, gate)
    if gate == "modality":  # zero at construction; give every modality its own preference
        with torch.no_grad():
            layer.modality_bias.copy_(torch.randn(EXPERTS, EXPERTS))
    return layer


MODALITY = torch.tensor([0, 2, 1, 2])


@pytest.mark.parametrize("gate", GATES)
def test_gate_weights_are_a_distribution(gate):
    layer = make(gate)
    x = torch.randn(4, 5, 6, DIM)
    w = layer.gate_weights(x, MODALITY)
    width = DIM if gate == "channels" else EXPERTS  # the authors' gate: a softmax over channels
    assert w.shape == (4, 30, width)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 30), rtol=0, atol=1e-6)


def test_modality_gate_depends_on_the_modality_and_starts_as_the_paper_gate():
    torch.manual_seed(0)
    paper, conditioned = M4oE(DIM, EXPERTS, "experts"), M4oE(DIM, EXPERTS, "modality")
    conditioned.load_state_dict({**paper.state_dict(), "modality_bias": torch.zeros(EXPERTS, EXPERTS)})
    x = torch.randn(4, 7, DIM)
    torch.testing.assert_close(conditioned(x, MODALITY), paper(x), rtol=0, atol=0)
    with torch.no_grad():
        conditioned.modality_bias[2] += torch.tensor([0.0, 0.0, 5.0])  # modality 2 now favours expert 2
    w = conditioned.gate_weights(x, MODALITY)
    assert (w[1, :, 2] > paper.gate_weights(x)[1, :, 2]).all() and torch.equal(w[0], paper.gate_weights(x)[0])


@pytest.mark.parametrize("gate", GATES)
def test_forward_matches_reference_and_keeps_shape(gate):
    layer = make(gate)
    x = torch.randn(4, 3, 5, DIM)
    out = layer(x, MODALITY)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference(layer, x.reshape(4, 15, DIM), MODALITY).reshape(x.shape),
                               rtol=1e-5, atol=1e-6)


def test_onehot_gates_give_exactly_the_chosen_expert():
    x = torch.randn(4, 9, DIM)
    layer = make("onehot")
    out = layer(x, MODALITY)
    for b, e in enumerate(MODALITY.tolist()):
        torch.testing.assert_close(out[b], expert_ref(layer, e, x[b]), rtol=1e-6, atol=1e-6)
    # the paper's gate saturated at expert 1 (softmax of (-1e4, 0, -1e4) is exactly one-hot in float32)
    paper = make("experts")
    with torch.no_grad():
        paper.gate.weight.zero_()
        paper.gate.bias.copy_(torch.tensor([-1e4, 0.0, -1e4]))
    assert torch.equal(paper.gate_weights(x), torch.tensor([0.0, 1.0, 0.0]).expand(4, 9, 3))
    torch.testing.assert_close(paper(x), expert_ref(paper, 1, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gate", GATES)
def test_batch_equals_one_by_one(gate):
    layer = make(gate)
    x = torch.randn(4, 11, DIM)
    batched = layer(x, MODALITY)
    singles = torch.cat([layer(x[i:i + 1], MODALITY[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, singles, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gate", GATES)
def test_every_parameter_gets_a_gradient(gate):
    layer = make(gate)
    layer(torch.randn(4, 6, DIM), MODALITY).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_modality_is_ignored_by_the_input_only_gates():
    for gate in ("experts", "channels"):
        layer, x = make(gate), torch.randn(2, 4, DIM)
        assert torch.equal(layer(x), layer(x, torch.tensor([1, 0])))


@pytest.mark.parametrize("gate", ["modality", "onehot"])
def test_bad_modality_is_refused_with_the_rule(gate):
    layer, x = make(gate), torch.randn(2, 4, DIM)
    with pytest.raises(ValueError, match=rf"gate='{gate}' needs the modality of every sample: call the network "
                                         r"as network\(x, modality\) with a \(2,\) integer tensor of modality "
                                         r"indices 0\.\.2"):
        layer(x)
    with pytest.raises(ValueError, match=r"indices \[3, 7\] are out of range: this layer has 3 experts, one per "
                                         r"modality, so indices must be in 0\.\.2"):
        layer(x, torch.tensor([7, 3]))
    with pytest.raises(ValueError, match=r"integer tensor of shape \(2,\) \(one index per sample\), got a "
                                         r"torch.float32 tensor of shape \(2,\)"):
        layer(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\).*got a torch.int64 tensor of shape \(3,\)"):
        layer(x, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"shape \(2,\).*got list"):
        layer(x, [0, 1])


def test_bad_construction_and_input():
    with pytest.raises(ValueError, match="gate must be one of experts, channels, modality, onehot, got 'topk'"):
        M4oE(DIM, 2, "topk")
    with pytest.raises(ValueError, match="num_experts must be an integer >= 1"):
        M4oE(DIM, 0)
    with pytest.raises(ValueError, match=r"M4oE\(dim=8\) expects .*got shape \(2, 8, 4\)"):
        M4oE(DIM, 2)(torch.randn(2, 8, 4))


def test_parameter_layout():
    shapes = {k: tuple(v.shape) for k, v in M4oE(96, 3, "experts").state_dict().items()}
    assert shapes == {"experts.fc1_weight": (3, 384, 96), "experts.fc1_bias": (3, 384),
                      "experts.fc2_weight": (3, 96, 384), "experts.fc2_bias": (3, 96),
                      "gate.weight": (3, 96), "gate.bias": (3,)}
    assert tuple(M4oE(96, 3, "channels").gate.weight.shape) == (96, 96)
    assert tuple(M4oE(96, 3, "modality").modality_bias.shape) == (3, 3)
    assert not hasattr(M4oE(96, 3, "onehot"), "gate")
