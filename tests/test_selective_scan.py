"""Pure-PyTorch selective scan vs a float64 sequential loop (values, last state, gradients), backends, errors."""
import pytest
import torch
import torch.nn.functional as F

from nnunet_moe.layers import selective_scan as scan_module
from nnunet_moe.layers import selective_scan_chunks as chunks_module
from nnunet_moe.layers import selective_scan_kernels as kernels_module
from nnunet_moe.layers import softplus as softplus_module
from nnunet_moe.layers.selective_scan import BACKEND_ENV_VAR, selective_scan


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Plain loop over positions, float64, straight from the recurrence; returns (out, last_state)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d_in, length = u.shape
    if B.dim() == 3:
        B = B[:, None]
    if C.dim() == 3:
        C = C[:, None]
    B = B.repeat_interleave(d_in // B.shape[1], dim=1)  # (batch, D_in, N, L)
    C = C.repeat_interleave(d_in // C.shape[1], dim=1)
    h = u.new_zeros(batch, d_in, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[..., t] * u[:, :, t, None]
        ys.append((h * C[..., t]).sum(-1))
    out = torch.stack(ys, -1)
    if D is not None:
        out = out + u * D.double()[:, None]
    if z is not None:
        out = out * F.silu(z.double())
    return out, h


def make_inputs(length, batch=2, d_in=8, n_state=4, groups_b=None, groups_c=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed + length)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u = rnd(batch, d_in, length)
    delta = rnd(batch, d_in, length) * 0.5
    A = -torch.exp(rnd(d_in, n_state) * 0.5 + 0.5)  # negative, |A| ~ 0.6..8
    B = rnd(batch, n_state, length) if groups_b is None else rnd(batch, groups_b, n_state, length)
    C = rnd(batch, n_state, length) if groups_c is None else rnd(batch, groups_c, n_state, length)
    D = rnd(d_in)
    z = rnd(batch, d_in, length)
    delta_bias = rnd(d_in) * 0.5 - 1.0
    return u, delta, A, B, C, D, z, delta_bias


def assert_close_to_reference(ours, ref):
    # rtol 1e-5 as asked; atol 1e-6 of the largest |value|: float32 rounding (eps 1.2e-7) accumulates
    # over the summed terms of an output, so an output that cancels to ~0 carries absolute, not relative,
    # error of that size.
    atol = 1e-6 * ref.abs().max().item()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=atol)


CONFIGS = {
    "plain": dict(),
    "D": dict(use_D=True),
    "z": dict(use_z=True),
    "bias_softplus": dict(use_bias=True, softplus=True),
    "softplus_only": dict(softplus=True),
    "all": dict(use_D=True, use_z=True, use_bias=True, softplus=True),
    "grouped_all": dict(use_D=True, use_z=True, use_bias=True, softplus=True, groups_b=2, groups_c=4),
}


@pytest.mark.parametrize("length", [1, 7, 64, 100, 257])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_float64_loop(length, config):
    cfg = CONFIGS[config]
    u, delta, A, B, C, D, z, bias = make_inputs(length, groups_b=cfg.get("groups_b"), groups_c=cfg.get("groups_c"))
    if not cfg.get("softplus"):
        delta = delta.abs()  # keep the raw delta a positive step size, as softplus would
    kwargs = dict(D=D if cfg.get("use_D") else None, z=z if cfg.get("use_z") else None,
                  delta_bias=bias if cfg.get("use_bias") else None, delta_softplus=cfg.get("softplus", False))
    # chunk 16 puts several chunks (and padding for 7, 100, 257) into the test
    out, last = selective_scan(u, delta, A, B, C, return_last_state=True, backend="torch", chunk_size=16, **kwargs)
    ref, ref_last = reference_scan(u, delta, A, B, C, **kwargs)
    assert out.dtype == torch.float32 and out.shape == u.shape and last.shape == (2, 8, 4)
    assert_close_to_reference(out, ref)
    assert_close_to_reference(last, ref_last)


@pytest.mark.parametrize("log_step_on_cpu", [False, True])
def test_default_chunk_and_log_step_path_agree_with_loop(monkeypatch, log_step_on_cpu):
    # the log-step cross-chunk scan runs on CUDA only; declaring the CPU a log-step device tests it here
    if log_step_on_cpu:
        monkeypatch.setattr(chunks_module, "_LOG_STEP_DEVICE_TYPES", ("cpu",))
    calls, torch_cat = [], torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or torch_cat(*a, **k))
    u, delta, A, B, C, D, z, bias = make_inputs(300)
    ref, _ = reference_scan(u, delta, A, B, C, D, z, bias, True)
    for chunk in (64, 1):  # chunk 1 -> 300 chunks: above _SEQUENTIAL_CHUNK_LIMIT
        out = selective_scan(u, delta, A, B, C, D, z, bias, True, backend="torch", chunk_size=chunk)
        assert_close_to_reference(out, ref)
    assert bool(calls) == log_step_on_cpu  # the log-step scan (torch.cat per step) ran iff asked for


@pytest.mark.parametrize("invariant", [False, True])
def test_no_grad_forward_in_position_blocks_matches_loop(monkeypatch, invariant):
    """Without gradients the scan runs in blocks of positions chained by their last state; small
    blocks (32 positions: 4 blocks, the last one partial and padded) must give the loop's numbers."""
    u, delta, A, B, C, D, z, bias = make_inputs(100, groups_b=2, groups_c=4)
    if invariant:
        B, C = torch.randn(8, 4), torch.randn(8, 4)
    monkeypatch.setattr(kernels_module, "BLOCK_ELEMENTS", 2 * 8 * 4 * 32)  # batch x D_in x N x 32 positions
    blocks, chunk_states = [], kernels_module.chunk_states
    monkeypatch.setattr(kernels_module, "chunk_states",
                        lambda chunks, *a, **k: blocks.append(chunks.rel.shape[-2:]) or chunk_states(chunks, *a, **k))
    with torch.no_grad():
        out, last = selective_scan(u, delta, A, B, C, D, z, bias, True, True, backend="torch", chunk_size=16)
    assert blocks == [(2, 16)] * 3 + [(1, 4)]  # chunks x T: 32, 32, 32 and 4 positions
    if invariant:
        B, C = (m[None, :, :, None].expand(2, 8, 4, 100) for m in (B, C))
    ref, ref_last = reference_scan(u, delta, A, B, C, D, z, bias, True)
    assert_close_to_reference(out, ref)
    assert_close_to_reference(last, ref_last)


def test_time_invariant_B_C():
    u, delta, A, _, _, D, _, _ = make_inputs(33)
    B = torch.randn(8, 4)
    C = torch.randn(8, 4)
    out = selective_scan(u, delta.abs(), A, B, C, D, backend="torch", chunk_size=8)
    ref, _ = reference_scan(u, delta.abs(), A, B[None, :, :, None].expand(2, 8, 4, 33), C[None, :, :, None].expand(2, 8, 4, 33), D)
    assert_close_to_reference(out, ref)


def test_huge_decays_stay_finite_and_exact():
    # |delta * A| up to 500 per step: naive exp(cumsum) formulations overflow float32 (exp(88) = inf)
    g = torch.Generator().manual_seed(3)
    u = torch.randn(1, 4, 200, generator=g)
    delta = torch.rand(1, 4, 200, generator=g) * 50
    A = -torch.rand(4, 3, generator=g) * 10
    B = torch.randn(1, 3, 200, generator=g)
    C = torch.randn(1, 3, 200, generator=g)
    out = selective_scan(u, delta, A, B, C, backend="torch")
    ref, _ = reference_scan(u, delta, A, B, C)
    assert torch.isfinite(out).all()
    assert_close_to_reference(out, ref)


@pytest.mark.parametrize("blocks", [False, True])
def test_gradcheck_float64(monkeypatch, blocks):
    if blocks:  # forward and backward in blocks of 4 positions (4, 4, 1) chained by their states
        monkeypatch.setattr(kernels_module, "BLOCK_ELEMENTS", 1 * 4 * 3 * 4)
    u, delta, A, B, C, D, z, bias = (t.double().requires_grad_() for t in make_inputs(9, batch=1, d_in=4, n_state=3,
                                                                                       groups_b=2))

    def fn(u, delta, A, B, C, D, z, bias):
        out, last = selective_scan(u, delta, A, B, C, D, z, bias, True, True, backend="torch", chunk_size=4)
        return out, last

    assert torch.autograd.gradcheck(fn, (u, delta, A, B, C, D, z, bias), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_float32_gradients_match_float64_reference():
    inputs = make_inputs(64, groups_b=2)
    ours_in = [t.clone().requires_grad_() for t in inputs]
    ref_in = [t.double().requires_grad_() for t in inputs]
    grad_out = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(5))
    u, delta, A, B, C, D, z, bias = ours_in
    (selective_scan(u, delta, A, B, C, D, z, bias, True, backend="torch", chunk_size=16) * grad_out).sum().backward()
    u, delta, A, B, C, D, z, bias = ref_in
    (reference_scan(u, delta, A, B, C, D, z, bias, True)[0] * grad_out.double()).sum().backward()
    for name, ours, ref in zip("u delta A B C D z delta_bias".split(), ours_in, ref_in):
        atol = 1e-5 * ref.grad.abs().max().item()
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=atol, msg=f"gradient of {name}")


def _grads_vs_reference(inputs, ours_fn, ref_fn, out_shape, seed=5):
    """Gradients of sum(out * w) (and of the last state when returned) against the float64 loop."""
    ours_in = [t.clone().requires_grad_() for t in inputs]
    ref_in = [t.double().requires_grad_() for t in inputs]
    w = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed))
    (ours_fn(*ours_in) * w).sum().backward()
    (ref_fn(*ref_in) * w.double()).sum().backward()
    for i, (ours, ref) in enumerate(zip(ours_in, ref_in)):
        if ref.grad is None:  # input that does not reach this output (D and z for the last state)
            assert ours.grad is None or not ours.grad.any(), f"input {i} should get no gradient"
            continue
        atol = 1e-5 * ref.grad.abs().max().item()
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=atol, msg=f"gradient of input {i}")


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("layout", ["time_invariant", "one_channel_per_group", "grouped_c", "last_state"])
def test_hand_written_backward_layouts(monkeypatch, layout, blocks):
    """The custom backward reduces gradients to every B / C layout, and handles the last state's gradient;
    also in blocks of 16 positions (16, 16, 5: the adjoint state chained from the last block back)."""
    if blocks:
        monkeypatch.setattr(kernels_module, "BLOCK_ELEMENTS", 2 * 8 * 4 * 16)  # batch x D_in x N x 16 positions
    u, delta, A, B, C, D, z, bias = make_inputs(37)
    scan = dict(backend="torch", chunk_size=8)
    if layout == "time_invariant":
        B, C = torch.randn(8, 4), torch.randn(8, 4)
        inputs = (u, delta.abs(), A, B, C)
        ours_fn = lambda u, d, A, B, C: selective_scan(u, d, A, B, C, **scan)  # noqa: E731
        ref_fn = lambda u, d, A, B, C: reference_scan(  # noqa: E731
            u, d, A, B[None, :, :, None].expand(2, 8, 4, 37), C[None, :, :, None].expand(2, 8, 4, 37))[0]
        _grads_vs_reference(inputs, ours_fn, ref_fn, u.shape)
        return
    if layout == "one_channel_per_group":  # G = D_in: the B gradient has the full (B, D_in, N, L) shape
        B = torch.randn(2, 8, 4, 37)
    if layout == "grouped_c":
        C = torch.randn(2, 4, 4, 37)
    if layout == "last_state":
        ours_fn = lambda *t: selective_scan(*t, delta_softplus=True, return_last_state=True, **scan)[1]  # noqa: E731
        ref_fn = lambda *t: reference_scan(*t, delta_softplus=True)[1]  # noqa: E731
        _grads_vs_reference((u, delta, A, B, C, D, z, bias), ours_fn, ref_fn, (2, 8, 4))
        return
    ours_fn = lambda *t: selective_scan(*t, delta_softplus=True, **scan)  # noqa: E731
    ref_fn = lambda *t: reference_scan(*t, delta_softplus=True)[0]  # noqa: E731
    _grads_vs_reference((u, delta, A, B, C, D, z, bias), ours_fn, ref_fn, u.shape)


def test_backward_of_chained_scans_and_huge_decays():
    """Two scans in one graph (their backwards share the scratch buffers) with decays up to exp(-500)."""
    g = torch.Generator().manual_seed(11)
    u = torch.randn(1, 4, 90, generator=g)
    delta = torch.rand(1, 4, 90, generator=g) * 20
    A = -torch.rand(4, 3, generator=g) * 25
    B, C, B2, C2 = (torch.randn(1, 3, 90, generator=g) for _ in range(4))

    def ours_fn(u, delta, A, B, C, B2, C2):
        first = selective_scan(u, delta, A, B, C, backend="torch", chunk_size=16)
        return selective_scan(first, delta * 0.01, A, B2, C2, backend="torch", chunk_size=16)

    def ref_fn(u, delta, A, B, C, B2, C2):
        return reference_scan(reference_scan(u, delta, A, B, C)[0], delta * 0.01, A, B2, C2)[0]

    _grads_vs_reference((u, delta, A, B, C, B2, C2), ours_fn, ref_fn, u.shape)


def test_low_precision_inputs_keep_dtype():
    u, delta, A, B, C, D, z, bias = make_inputs(20)
    out = selective_scan(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), D, z.bfloat16(), bias, True,
                         backend="torch")
    ref, _ = reference_scan(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), D, z.bfloat16(), bias, True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.skipif(scan_module.mamba_ssm_available(), reason="mamba_ssm is installed")
def test_explicit_cuda_kernel_without_mamba_ssm_raises():
    u, delta, A, B, C, *_ = make_inputs(5)
    with pytest.raises(ImportError, match=r"pip install nnunet-moe\[cuda\]"):
        selective_scan(u, delta, A, B, C, backend="mamba_ssm")


def test_backend_env_var_and_bad_backend(monkeypatch):
    u, delta, A, B, C, *_ = make_inputs(5)
    called = []
    original = scan_module.selective_scan_torch
    monkeypatch.setattr(scan_module, "selective_scan_torch", lambda *a, **k: called.append(1) or original(*a, **k))
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
    selective_scan(u, delta, A, B, C)
    assert called == [1]
    monkeypatch.setenv(BACKEND_ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        selective_scan(u, delta, A, B, C)
    with pytest.raises(ValueError, match="backend"):
        selective_scan(u, delta, A, B, C, backend="triton")


def test_auto_backend_uses_torch_on_cpu():
    assert scan_module._resolve_backend("auto", on_cuda=False) == "torch"


@pytest.mark.parametrize("bad", ["delta", "A", "B", "D", "z", "groups"])
def test_bad_shapes_raise_value_error(bad):
    u, delta, A, B, C, D, z, bias = make_inputs(6)
    kwargs = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z)
    if bad == "groups":
        kwargs["B"] = torch.randn(2, 3, 4, 6)  # 8 channels are not divisible into 3 groups
    elif bad == "D":
        kwargs["D"] = torch.randn(7)
    else:
        kwargs[bad] = kwargs[bad][..., :-1]
    with pytest.raises(ValueError, match="must have"):
        selective_scan(**kwargs, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_softplus_matches_torch(dtype):
    """The scan's softplus (exp / log2, Goldberg's log1p) equals F.softplus to a few ulp, gradient sigmoid."""
    x = torch.cat([torch.linspace(-80, 100, 20001, dtype=dtype), torch.randn(10000, dtype=dtype) * 10,
                   torch.tensor([0.0, 1e-30, -1e-30, 17.0, -17.0, 1e-8, -1e-8], dtype=dtype)])
    ref = F.softplus(x.double(), threshold=1000)
    rel_err = ((softplus_module.softplus(x).double() - ref) / ref).abs().max().item()
    assert rel_err < (4 * torch.finfo(dtype).eps if dtype == torch.float32 else 1e-14)
    out = softplus_module.softplus(torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=dtype))
    assert out[0] == float("inf") and out[1] == 0 and torch.isnan(out[2])
    xg = torch.randn(7, dtype=torch.float64, requires_grad=True)
    softplus_module.softplus(xg).sum().backward()
    torch.testing.assert_close(xg.grad, torch.sigmoid(xg.detach()))
    assert torch.autograd.gradcheck(softplus_module.softplus, (torch.randn(5, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("config", ["all", "softplus_only", "plain"])
def test_no_grad_path_works_in_place_on_its_own_tensors_only(config):
    """Without gradients delta, the output and the gate are computed in place: the caller's tensors stay
    untouched and the numbers equal the gradient path's."""
    opts = CONFIGS[config]
    u, delta, A, B, C, D, z, bias = make_inputs(70)
    args = (u, delta, A, B, C, D if opts.get("use_D") else None, z if opts.get("use_z") else None,
            bias if opts.get("use_bias") else None, opts.get("softplus", False))
    before = [t.clone() if t is not None else None for t in args[:8]]
    with torch.no_grad():
        out = selective_scan(*args, backend="torch", chunk_size=16)
    for t, saved in zip(args[:8], before):
        assert t is None or torch.equal(t, saved)
    grad_args = [t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
    torch.testing.assert_close(out, selective_scan(*grad_args, backend="torch", chunk_size=16).detach(),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="no gradient"):
        softplus_module.softplus(grad_args[1], inplace=True)


def test_chunk_length_is_chosen_per_block(monkeypatch):
    """Large decays in one block shorten only that block's chunks; values and gradients stay exact."""
    g = torch.Generator().manual_seed(21)
    u = torch.randn(1, 4, 96, generator=g)
    delta = torch.rand(1, 4, 96, generator=g) * 0.05
    delta[..., 40:56] = 20.0                                # |delta * A| up to 200 per step in block 2
    A = -torch.rand(4, 3, generator=g) * 10
    B, C = torch.randn(1, 3, 96, generator=g), torch.randn(1, 3, 96, generator=g)
    monkeypatch.setattr(kernels_module, "BLOCK_ELEMENTS", 4 * 3 * 32)  # blocks of 32 positions
    lengths, chunk_states = [], kernels_module.chunk_states
    monkeypatch.setattr(kernels_module, "chunk_states",
                        lambda chunks, *a, **k: lengths.append(chunks.T) or chunk_states(chunks, *a, **k))
    with torch.no_grad():
        out = selective_scan(u, delta, A, B, C, backend="torch", chunk_size=32)
    assert lengths[0] == lengths[2] == 32 and lengths[1] == 1
    assert_close_to_reference(out, reference_scan(u, delta, A, B, C)[0])
    _grads_vs_reference((u, delta, A, B, C), lambda *t: selective_scan(*t, backend="torch", chunk_size=32),
                        lambda *t: reference_scan(*t)[0], u.shape)
