"""Tests of the NMSW-Net model (nnunet_moe.networks.nmsw) with tiny networks on tiny volumes."""
import numpy as np
import pytest
import torch
from torch import nn

from nnunet_moe.layers.patch_grid import PatchGrid, pad_to_patch_size
from nnunet_moe.networks.nmsw import ENTROPY_WEIGHT, NMSWNet, first_output, selection_entropy
from nnunet_moe.networks.nmsw_plans import build_default_nmsw_from_plans

NUM_CLASSES = 3


def tiny_net(in_channels=1, num_classes=NUM_CLASSES, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(in_channels, 4, 3, padding=1), nn.LeakyReLU(0.01),
                         nn.Conv3d(4, num_classes, 1))


def make_model(**kwargs):
    options = dict(num_classes=NUM_CLASSES, in_channels=1, patch_size=(8, 8, 8), global_input_size=(8, 8, 8),
                   k_train=3, k_random=1, k_infer=4)
    options.update(kwargs)
    return NMSWNet(tiny_net(seed=0), tiny_net(seed=1), **options)


class FixedLogits(nn.Module):
    """Global net stand-in: background everywhere except a foreground box (class 1)."""

    def __init__(self, size, box):
        super().__init__()
        logits = torch.zeros(1, NUM_CLASSES, *size)
        logits[:, 0] = 1.0
        logits[(slice(None), 1, *box)] = 5.0
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1, -1, -1, -1)


def test_training_forward_shapes_and_straight_through_crops():
    torch.manual_seed(0)
    model = make_model().train()
    x = torch.randn(2, 1, 24, 20, 16)
    out = model(x)
    grid = PatchGrid((24, 20, 16), (8, 8, 8))
    assert grid.grid_shape == (5, 4, 3)
    g = grid.num_cells
    assert out.logits.shape == (2, NUM_CLASSES, 24, 20, 16)
    assert out.global_logits.shape == (2, NUM_CLASSES, 24, 20, 16)
    assert out.global_logits_low.shape == (2, NUM_CLASSES, 8, 8, 8)
    assert out.local_logits.shape == (2, 4, NUM_CLASSES, 8, 8, 8)
    assert out.selection.shape == (2, 4, g) and out.cell_indices.shape == (2, 4)
    assert out.objectness.shape == (2, g) and out.foreground_cells.shape == (2, g)
    assert torch.allclose(out.selection_probs.sum(-1), torch.ones(2))
    assert out.is_random.tolist() == [False, False, False, True]
    assert out.grid.grid_shape == grid.grid_shape
    for b in range(2):
        assert len(set(out.cell_indices[b].tolist())) == 4
        assert out.patch_slices[b] == [grid.cell_slices(i) for i in out.cell_indices[b].tolist()]
        # the straight-through weight is exactly 1 forward: local logits = local_net(crop)
        crop = x[(b, slice(None), *out.patch_slices[b][0])][None]
        assert torch.allclose(out.local_logits[b, 0], model.local_net(crop)[0], atol=1e-6)
    targets = model.crop_patches(torch.arange(24 * 20 * 16.).view(1, 1, 24, 20, 16).expand(2, 1, -1, -1, -1),
                                 out.cell_indices)
    assert targets.shape == (2, 4, 1, 8, 8, 8)
    assert torch.equal(targets[1, 2, 0], torch.arange(24 * 20 * 16.).view(24, 20, 16)[out.patch_slices[1][2]])
    assert model.resize_to_global(torch.randint(0, 3, (2, 1, 24, 20, 16)), is_label=True).shape == (2, 1, 8, 8, 8)


def test_gradients_reach_objectness_head_global_and_local_nets():
    torch.manual_seed(1)
    model = make_model().train()
    x = torch.randn(2, 1, 24, 20, 16)
    target = torch.randint(0, NUM_CLASSES, (2, 24, 20, 16))
    out = model(x)
    loss = nn.functional.cross_entropy(out.logits, target)  # no entropy term: ST path alone
    loss.backward()
    for name, parameter in model.named_parameters():
        if name == "objectness_head.layers.4.bias":
            continue  # adds the same constant to every cell: softmax-invariant, gradient ~0 by design
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name

    # The objectness head's only route without the entropy term is the straight-through crop weight:
    model.zero_grad()
    out = model(x)
    out.local_logits.square().mean().backward()
    head_grad = sum(p.grad.abs().sum() for p in model.objectness_head.parameters() if p.grad is not None)
    assert head_grad > 0

    # full loss as in the paper, entropy included
    model.zero_grad()
    out = model(x)
    loss = nn.functional.cross_entropy(out.logits, target) - ENTROPY_WEIGHT * selection_entropy(out.objectness)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_predict_full_size_finite_without_sliding_window():
    model = make_model(k_infer=3, infer_only_foreground=False).train()
    calls = []
    model.local_net.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    volume = torch.randn(1, 24, 20, 16)
    logits = model.predict(volume)
    assert logits.shape == (NUM_CLASSES, 24, 20, 16)
    assert torch.isfinite(logits).all()
    assert calls == [1, 1, 1]  # K=3 single-patch local passes (local_batch_size 1), not the 60-cell window
    assert model.training  # mode restored
    batched = model.predict(volume[None].expand(2, -1, -1, -1, -1))
    assert batched.shape == (2, NUM_CLASSES, 24, 20, 16)
    assert torch.allclose(batched[0], logits, atol=1e-5)


@pytest.mark.parametrize("local_batch_size,expected_calls", [(1, [1] * 5), (2, [2, 2, 1]), (8, [5])])
def test_predict_streams_patches_in_chunks_with_the_same_result(local_batch_size, expected_calls):
    """Memory at inference is bounded by ``local_batch_size`` patches; the chunked accumulation equals
    the all-at-once forward pass (eval mode, deterministic top-K) for any chunk size."""
    model = make_model(k_infer=5, infer_only_foreground=False, mask_background=False,
                       local_batch_size=local_batch_size).eval()
    calls = []
    model.local_net.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    volume = torch.randn(1, 24, 20, 16)
    logits = model.predict(volume)
    assert calls == expected_calls
    with torch.no_grad():
        out = model(volume[None], k=5)  # all K patches in one local call, full-size accumulators
    assert torch.allclose(logits, out.logits[0], atol=1e-5)
    # predict accumulates and blends only in the selected cells' bounding box: make sure the test
    # covers voxels outside it (there the output is the upsampled global logits, exactly)
    outside = torch.ones(volume.shape[1:], dtype=torch.bool)
    box = tuple(slice(min(s[a].start for s in out.patch_slices[0]), max(s[a].stop for s in out.patch_slices[0]))
                for a in range(3))
    outside[box] = False
    assert outside.any()
    assert torch.equal(logits[:, outside], out.global_logits[0][:, outside])


@pytest.mark.parametrize("broken", ["global", "local"])
def test_predict_refuses_non_finite_network_outputs(broken):
    model = make_model(k_infer=2, infer_only_foreground=False, mask_background=False)
    net = model.global_net if broken == "global" else model.local_net
    net.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    what = "the global network's output" if broken == "global" else "the local network's output for grid cells"
    with pytest.raises(RuntimeError, match=f"non-finite values \\(NaN/inf\\) in {what}"):
        model.predict(torch.randn(1, 24, 20, 16))


def test_local_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="local_batch_size must be a positive integer, got 0"):
        make_model(local_batch_size=0)


def test_predict_on_all_cells_with_local_blend_equals_sliding_window():
    from nnunet_moe.layers.patch_aggregation import PatchAggregation

    model = make_model(k_infer=1000, blend="local", mask_background=False, global_input_size=(8, 8, 8))
    volume = torch.randn(1, 24, 20, 16)
    logits = model.predict(volume)
    # sliding-window average of the same local net over every grid cell
    padded, slicer = pad_to_patch_size(volume[None], (8, 8, 8))
    grid = PatchGrid(padded.shape[2:], (8, 8, 8))
    with torch.no_grad():
        local = torch.stack([model.local_net(padded[(slice(None), slice(None), *s)])[0]
                             for s in grid.all_slices()])[None]
    reference = PatchAggregation(NUM_CLASSES, (8, 8, 8), blend="local")(
        torch.zeros(1, NUM_CLASSES, *padded.shape[2:]), local, [grid.all_slices()])[0]
    assert torch.allclose(logits, reference, atol=1e-5)


def test_volume_smaller_than_patch_is_padded_like_nnunet():
    model = make_model(k_infer=2).eval()
    x = torch.randn(1, 1, 5, 12, 6)
    out = model(x)
    assert out.grid.image_size == (8, 12, 8)
    assert out.pad_slicer == (slice(1, 6), slice(0, 12), slice(1, 7))
    assert out.logits.shape == (1, NUM_CLASSES, 5, 12, 6)
    assert out.global_logits.shape == (1, NUM_CLASSES, 5, 12, 6)
    assert torch.isfinite(out.logits).all()
    logits = model.predict(x[0])
    assert logits.shape == (NUM_CLASSES, 5, 12, 6) and torch.isfinite(logits).all()
    assert model.crop_patches(torch.ones(1, 1, 5, 12, 6), out.cell_indices).shape == (1, 2, 1, 8, 8, 8)


class PreferElsewhere(nn.Module):
    """Objectness stand-in that scores every voxel highly except the foreground corner."""

    def forward(self, global_logits_low, x_low):
        scores = torch.full_like(global_logits_low[:, :1], 10.0)
        scores[:, :, :4, :4, :4] = 0.0
        return scores


def test_background_masking_selects_the_only_foreground_cell():
    # volume 32^3, patch 16, step 8 -> 3x3x3 cells; global grid 8^3 (scale 1/4). The global
    # foreground box [0, 2)^3 lies only in cell 0's footprint ([0, 4)^3 on the global grid).
    model = NMSWNet(FixedLogits((8, 8, 8), (slice(0, 2),) * 3), tiny_net(seed=1), NUM_CLASSES, 1,
                    (16, 16, 16), (8, 8, 8), k_infer=1)
    model.objectness_head = PreferElsewhere()
    model.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    out = model(x)
    assert out.foreground_cells[0].nonzero().flatten().tolist() == [0]
    assert out.cell_indices.tolist() == [[0]]
    assert torch.all(out.objectness[0, 1:] < -9000) and torch.isfinite(out.objectness).all()

    model.mask_background = False  # without the mask the head's preference wins
    assert model(x).cell_indices.tolist() != [[0]]

    model.mask_background, model.topk.k_eval = True, 5
    calls = []
    model.local_net.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    logits = model.predict(x[0])
    assert calls == [1]  # k_infer=5 but only one foreground cell
    assert torch.isfinite(logits).all()

    # no foreground cell at all: predict returns the upsampled global logits, no local pass
    model.global_net = FixedLogits((8, 8, 8), (slice(0, 0),) * 3)
    calls.clear()
    logits = model.predict(x[0])
    assert calls == []
    expected = nn.functional.interpolate(model.global_net(x)[:, :], size=(32, 32, 32), mode="trilinear")[0]
    assert torch.allclose(logits, expected)


def test_deep_supervision_outputs_use_element_zero():
    class DeepSupervised(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_net(seed=2)

        def forward(self, x):
            full = self.net(x)
            return [full, full[:, :, ::2, ::2, ::2]]

    model = NMSWNet(DeepSupervised(), DeepSupervised(), NUM_CLASSES, 1, (8, 8, 8), (8, 8, 8), k_infer=2).eval()
    out = model(torch.randn(1, 1, 16, 16, 16))
    assert out.local_logits.shape == (1, 2, NUM_CLASSES, 8, 8, 8)
    assert first_output((torch.ones(1), torch.zeros(1))).item() == 1


def test_selection_entropy_values_and_finite_gradients():
    uniform = torch.zeros(2, 6)
    assert torch.allclose(selection_entropy(uniform), torch.tensor(np.log(6.0), dtype=torch.float32))
    masked = torch.tensor([[0.0, 1.0, -1e4, -1e4]], requires_grad=True)
    entropy = selection_entropy(masked)
    p = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    assert torch.allclose(entropy, -(p * p.log()).sum(), atol=1e-6)
    entropy.backward()
    assert torch.isfinite(masked.grad).all() and masked.grad[0, :2].abs().sum() > 0


def test_invalid_inputs_raise_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="x_low must have shape"):
        model(torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="spatial axes"):
        model(torch.randn(1, 16, 16, 16))
    with pytest.raises(ValueError, match="overlap"):
        make_model(overlap=1.0)
    with pytest.raises(ValueError, match="k_infer"):
        make_model(k_infer=0)
    with pytest.raises(ValueError, match="global_net returned shape"):
        NMSWNet(tiny_net(num_classes=2), tiny_net(), NUM_CLASSES, 1, (8, 8, 8), (8, 8, 8))(
            torch.randn(1, 1, 8, 8, 8))


def tiny_plans():
    return {
        "dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans",
        "configurations": {"3d_fullres": {
            "patch_size": [16, 16, 16],
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
                    "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                    "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}},
    }


def test_build_default_nmsw_from_plans():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(tiny_plans())
    configuration = plans_manager.get_configuration("3d_fullres")
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}}
    model = build_default_nmsw_from_plans(plans_manager, configuration, dataset_json, k_infer=2)
    assert type(model.global_net).__name__ == type(model.local_net).__name__ == "PlainConvUNet"
    assert model.global_net.decoder.deep_supervision is False and model.local_net.decoder.deep_supervision is False
    assert model.patch_size == model.global_input_size == (16, 16, 16)
    assert model.num_classes == 3 and model.in_channels == 1 and model.mask_background
    reference = get_network_from_plans(configuration.network_arch_class_name,
                                       configuration.network_arch_init_kwargs,
                                       configuration.network_arch_init_kwargs_req_import, 1, 3,
                                       deep_supervision=False)
    net_params = sum(p.numel() for p in reference.parameters())
    head_params = sum(p.numel() for p in model.objectness_head.parameters())
    # objectness from the U-Net's last 4 decoder features ("auto"): 4*16*27+16 + 16+1 = 1744 + 17
    assert model.objectness_source == "features" and head_params == 1761
    logits_head = build_default_nmsw_from_plans(plans_manager, configuration, dataset_json, objectness_from="logits")
    # head on (softmax, image): (3+1)*16*27+16 + 16*16*27+16 + 16+1 = 1744 + 6928 + 17
    assert sum(p.numel() for p in logits_head.objectness_head.parameters()) == 8689
    assert sum(p.numel() for p in model.parameters()) == 2 * net_params + head_params + 3
    logits = model.predict(torch.randn(1, 20, 16, 18))
    assert logits.shape == (3, 20, 16, 18) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="divisible by the architecture's total stride"):
        build_default_nmsw_from_plans(plans_manager, configuration, dataset_json, global_input_size=(15, 16, 16))


# ----------------------------------------------------------------------------- objectness source, aggregation
def plans_unet(seed=0):
    """The tiny PlainConvUNet of ``tiny_plans()`` as nnU-Net's get_network_from_plans builds it (no deep supervision)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    configuration = PlansManager(tiny_plans()).get_configuration("3d_fullres")
    torch.manual_seed(seed)
    return get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                  configuration.network_arch_init_kwargs_req_import, 1, NUM_CLASSES,
                                  deep_supervision=False)


def unet_model(**kwargs):
    options = dict(num_classes=NUM_CLASSES, in_channels=1, patch_size=(16, 16, 16), global_input_size=(16, 16, 16),
                   k_train=2, k_random=0, k_infer=2, mask_background=False)
    options.update(kwargs)
    return NMSWNet(plans_unet(0), tiny_net(seed=1), **options)


def test_auto_objectness_reads_features_of_a_plans_unet_and_logits_of_a_bare_net():
    from nnunet_moe.networks.nmsw import FeatureObjectnessHead, ObjectnessHead, penultimate_feature_layer

    unet = plans_unet()
    assert penultimate_feature_layer(unet) is unet.decoder.seg_layers[-1]
    model = NMSWNet(unet, tiny_net(seed=1), NUM_CLASSES, 1, (16, 16, 16), (16, 16, 16))
    assert model.objectness_source == "features" and isinstance(model.objectness_head, FeatureObjectnessHead)
    assert model.objectness_head.layers[0].in_channels == 4  # the U-Net's last decoder stage: 4 features
    bare = make_model()
    assert penultimate_feature_layer(bare.global_net) is None
    assert bare.objectness_source == "logits" and isinstance(bare.objectness_head, ObjectnessHead)
    forced = unet_model(objectness_from="logits")
    assert forced.objectness_source == "logits" and isinstance(forced.objectness_head, ObjectnessHead)


def test_features_objectness_on_a_net_without_features_is_a_clear_error():
    with pytest.raises(ValueError, match=r"objectness_from='features' needs the global network's penultimate "
                                         r"features, which are not reachable in a Sequential: "
                                         r"global_net.decoder.seg_layers must be"):
        make_model(objectness_from="features")
    with pytest.raises(ValueError, match="objectness_from must be one of"):
        make_model(objectness_from="softmax")


def test_features_objectness_gradients_reach_the_global_encoder_and_decoder_through_the_selection():
    torch.manual_seed(0)
    model = unet_model(objectness_from="features").train()
    out = model(torch.randn(1, 1, 32, 24, 16))  # 3 x 2 x 1 cells, 2 selected
    assert model._feature_tap.features is None  # no tensor kept once forward returned
    # the local logits depend on the global net only through the straight-through crop weights, i.e. the objectness
    out.local_logits.square().mean().backward()
    grads = {name: p.grad for name, p in model.global_net.named_parameters()}
    for part in ("encoder.stages.0.", "encoder.stages.1.", "decoder.stages.0.", "decoder.transpconvs.0."):
        selected = [g for name, g in grads.items() if name.startswith(part)]
        assert selected and all(g is not None and torch.isfinite(g).all() for g in selected), part
        assert sum(float(g.abs().sum()) for g in selected) > 0, part
    # from the features, not the logits: the output conv (whose input the features are) gets nothing here
    assert grads["decoder.seg_layers.0.weight"] is None
    assert sum(float(p.grad.abs().sum()) for p in model.objectness_head.parameters()) > 0


def test_features_objectness_predict_without_gradients_and_replaced_global_net():
    model = unet_model()
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 1, 32, 24, 16))
    assert torch.isfinite(out.objectness).all() and model._feature_tap.features is None
    assert model.predict(torch.randn(1, 20, 18, 16)).shape == (NUM_CLASSES, 20, 18, 16)
    # the feature layer runs outside NMSW's own global pass: nothing is recorded
    model.global_net(torch.randn(1, 1, 16, 16, 16))
    assert model._feature_tap.features is None
    model.global_net = plans_unet(seed=3)  # the hook sits on the network the NMSWNet was built with
    with pytest.raises(RuntimeError, match="feature layer .* did not run"):
        model(torch.randn(1, 1, 16, 16, 16))


@pytest.mark.parametrize("objectness_from", ["features", "logits"])
def test_detach_global_in_aggregation_stops_the_aggregated_loss_at_the_global_net(objectness_from):
    # a one-cell grid: softmax over one cell has zero gradient, so the selection carries none and the blend is
    # the only route from the aggregated output to the global net
    def global_grad(detach):
        model = unet_model(objectness_from=objectness_from, detach_global_in_aggregation=detach).train()
        out = model(torch.randn(1, 1, 16, 16, 16), k=1, k_random=0)
        out.logits.square().mean().backward()
        return sum(float(p.grad.abs().sum()) for p in model.global_net.parameters() if p.grad is not None), out

    attached, _ = global_grad(False)
    detached, out = global_grad(True)
    assert attached > 0
    assert detached == 0
    assert out.global_logits_low.requires_grad  # the low-resolution loss still trains the global net
