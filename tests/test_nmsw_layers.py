"""Tests of the NMSW-Net layers: patch grid, Gumbel top-K, Gaussian patch aggregation.

The aggregation is pinned against nnU-Net's own sliding-window code path (``nnUNetPredictor``).
"""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_moe.layers.gumbel_topk import GumbelTopK, gumbel_topk
from nnunet_moe.layers.patch_aggregation import PatchAggregation, gaussian_patch_weights
from nnunet_moe.layers.patch_grid import PatchGrid, box_sums, pad_to_patch_size, padded_shape


# ----------------------------------------------------------------------------- nnU-Net stand-ins
def make_predictor(network: nn.Module, patch_size, num_classes: int):
    """A real nnUNetPredictor, initialised through ``manual_initialization`` with minimal plans."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    configuration = ConfigurationManager({
        "patch_size": list(patch_size),
        "architecture": {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []}})
    plans = PlansManager({"configurations": {}})
    dataset_json = {"labels": {"background": 0, **{f"c{i}": i for i in range(1, num_classes)}},
                    "channel_names": {"0": "x"}}
    predictor.manual_initialization(network, plans, configuration, None, dataset_json, "nnUNetTrainer", None)
    assert predictor.label_manager.num_segmentation_heads == num_classes
    return predictor


def tiny_conv_net(in_channels=2, num_classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(in_channels, 4, 3, padding=1), nn.LeakyReLU(0.01),
                         nn.Conv3d(4, num_classes, 1)).eval()


# ----------------------------------------------------------------------------- Gumbel top-K
def test_straight_through_forward_is_one_hot_and_gradients_reach_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 10, requires_grad=True)
    result = gumbel_topk(logits, k=3, k_random=1, generator=generator)
    assert result.selection.shape == (2, 4, 10) and result.indices.shape == (2, 4)
    # forward value is exactly the one-hot of the chosen cells
    assert torch.equal(result.selection.detach(), nn.functional.one_hot(result.indices, 10).float())
    assert result.is_random.tolist() == [False, False, False, True]
    for row in result.indices:  # without replacement, random extra included
        assert len(set(row.tolist())) == 4
    weights = torch.randn(10, generator=generator)
    loss = (result.selection * weights).sum()
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_soft_selections_mask_previously_chosen_cells():
    logits = torch.randn(3, 7)
    result = gumbel_topk(logits, k=4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(result.soft.sum(-1), torch.ones(3, 4))
    for b, k in itertools.product(range(3), range(4)):
        earlier = result.indices[b, :k]
        assert torch.all(result.soft[b, k, earlier] == 0)  # iterative masked softmax
        assert result.soft[b, k, result.indices[b, k]] > 0


def test_first_gumbel_pick_follows_softmax_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(4000, 4)
    first = gumbel_topk(logits, k=2, generator=torch.Generator().manual_seed(2)).indices[:, 0]
    freq = torch.bincount(first, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_eval_topk_is_deterministic_and_equals_torch_topk():
    logits = torch.randn(3, 12)
    module = GumbelTopK(k=3, k_random=1, k_eval=5).eval()
    first, second = module(logits), module(logits)
    assert torch.equal(first.indices, second.indices)
    assert torch.equal(first.indices, torch.topk(logits, 5).indices)
    assert not first.is_random.any()
    module.train()
    train_result = module(logits)
    assert train_result.indices.shape == (3, 4) and train_result.is_random.tolist() == [False] * 3 + [True]


def test_eval_noise_option_changes_selection():
    logits = torch.zeros(1, 50)
    module = GumbelTopK(k=3, k_random=0, noise_at_eval=True).eval()
    picks = {tuple(module(logits).indices[0].tolist()) for _ in range(5)}
    assert len(picks) > 1


def test_scaled_straight_through_uses_soft_value():
    logits = torch.randn(2, 6)
    result = gumbel_topk(logits, k=2, add_noise=False, straight_through="scaled")
    chosen = result.selection.gather(2, result.indices.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, result.soft.gather(2, result.indices.unsqueeze(-1)).squeeze(-1))
    assert torch.all(chosen < 1)


def test_k_larger_than_grid_is_clamped_with_warning():
    logits = torch.randn(2, 5)
    with pytest.warns(UserWarning, match="exceeds the number of grid cells"):
        result = gumbel_topk(logits, k=8, k_random=2, add_noise=False)
    assert result.indices.shape == (2, 5)
    assert sorted(result.indices[0].tolist()) == list(range(5))
    # random extras are clamped to the cells left over
    result = gumbel_topk(logits, k=4, k_random=3, add_noise=True)
    assert result.indices.shape == (2, 5) and result.is_random.tolist() == [False] * 4 + [True]


@pytest.mark.parametrize("k", [0, -2])
def test_non_positive_k_raises(k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        gumbel_topk(torch.randn(1, 5), k=k)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        GumbelTopK(k=k)


def test_invalid_tau_and_random_count_raise():
    with pytest.raises(ValueError, match="tau"):
        gumbel_topk(torch.randn(1, 5), k=1, tau=0.0)
    with pytest.raises(ValueError, match="k_random"):
        gumbel_topk(torch.randn(1, 5), k=1, k_random=-1)
    with pytest.raises(ValueError, match=r"\(B, G\)"):
        gumbel_topk(torch.randn(5), k=1)


# ----------------------------------------------------------------------------- patch grid
@pytest.mark.parametrize("image_size, patch_size", [
    ((24, 40, 32), (16, 16, 16)),
    ((16, 17, 33), (16, 16, 16)),  # one axis equal to the patch, odd sizes
    ((110, 64, 65), (64, 64, 32)),
    ((9, 31, 8), (8, 8, 8)),
])
def test_patch_grid_matches_nnunet_sliding_window_slicers(image_size, patch_size):
    predictor = make_predictor(nn.Identity(), patch_size, 2)
    slicers = predictor._internal_get_sliding_window_slicers(image_size)
    grid = PatchGrid(image_size, patch_size, 0.5)
    assert len(grid) == len(slicers)
    assert grid.all_slices() == [tuple(s[1:]) for s in slicers]


def test_patch_grid_known_positions():
    # nnU-Net's own comment: image 110, patch 64, step 0.5 -> tiles at 0, 23, 46
    grid = PatchGrid((110, 64, 65), (64, 64, 32))
    assert grid.steps == [[0, 23, 46], [0], [0, 11, 22, 33]]
    assert grid.grid_shape == (3, 1, 4) and grid.num_cells == 12
    assert grid.cell_slices(5) == (slice(23, 87), slice(0, 64), slice(11, 43))


def test_patch_grid_refuses_small_volume_and_padding_matches_nnunet():
    with pytest.raises(ValueError, match="smaller than patch_size"):
        PatchGrid((12, 40, 32), (16, 16, 16))
    with pytest.raises(ValueError, match="step_size"):
        PatchGrid((32, 32, 32), (16, 16, 16), step_size=0.0)
    volume = torch.randn(2, 12, 40, 7)
    padded, slicer = pad_to_patch_size(volume, (16, 16, 16))
    assert padded.shape == (2, 16, 40, 16) == (2, *padded_shape((12, 40, 7), (16, 16, 16)))
    # centred: 4 = 2 + 2 voxels on axis 0, 9 = 4 + 5 on axis 2 (odd extra voxel above, like pad_nd_image)
    assert slicer == (slice(2, 14), slice(0, 40), slice(4, 11))
    assert torch.equal(padded[(slice(None), *slicer)], volume)
    assert padded[:, :2].abs().sum() == 0 and padded[..., 11:].abs().sum() == 0


def test_box_sums_match_brute_force():
    generator = torch.Generator().manual_seed(3)
    volume = torch.randn(2, 3, 7, 5, 6, generator=generator)
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(10):
        box = []
        for n in (7, 5, 6):
            lo = rng.integers(0, n)
            box.append([lo, rng.integers(lo + 1, n + 1)])
        boxes.append(box)
    boxes = np.array(boxes)
    sums = box_sums(volume, boxes)
    expected = torch.stack([volume[:, :, b[0, 0]:b[0, 1], b[1, 0]:b[1, 1], b[2, 0]:b[2, 1]].sum((2, 3, 4))
                            for b in boxes], dim=-1)
    assert sums.shape == (2, 3, 10)
    assert torch.allclose(sums, expected, atol=1e-5)


def test_cell_boxes_identity_and_scaled():
    grid = PatchGrid((24, 40, 32), (16, 16, 16))
    boxes = grid.cell_boxes((0, 0, 0), (24, 40, 32), (24, 40, 32))
    for i, slices in enumerate(grid.all_slices()):
        assert [tuple(b) for b in boxes[i]] == [(s.start, s.stop) for s in slices]
    half = grid.cell_boxes((0, 0, 0), (24, 40, 32), (12, 20, 16))
    assert np.array_equal(half, boxes // 2)  # all positions are even here


# ----------------------------------------------------------------------------- aggregation
def _local_logits_on_full_grid(network, volume, patch_size):
    """Pad like nnU-Net, run the network on every grid cell (one at a time, as the predictor does)."""
    padded, slicer = pad_to_patch_size(volume[None], patch_size)
    grid = PatchGrid(padded.shape[2:], patch_size, 0.5)
    with torch.no_grad():
        local = torch.stack([network(padded[(slice(None), slice(None), *s)])[0] for s in grid.all_slices()])
    return padded, slicer, grid, local[None]


@pytest.mark.parametrize("shape", [(24, 40, 32), (12, 40, 20)])  # second one needs nnU-Net's padding
def test_local_blend_over_full_grid_reproduces_nnunet_sliding_window(shape):
    patch_size, num_classes = (16, 16, 16), 3
    network = tiny_conv_net(2, num_classes)
    volume = torch.randn(2, *shape, generator=torch.Generator().manual_seed(4))
    predictor = make_predictor(network, patch_size, num_classes)
    reference = predictor.predict_sliding_window_return_logits(volume)  # float16 accumulators
    assert reference.shape == (num_classes, *shape)

    padded, slicer, grid, local = _local_logits_on_full_grid(network, volume, patch_size)
    garbage_global = torch.randn(1, num_classes, *padded.shape[2:]) * 100  # must not leak in: all covered
    all_slices = [grid.all_slices()]

    half = PatchAggregation(num_classes, patch_size, blend="local", accumulation_dtype=torch.float16)
    out_half = half(garbage_global, local, all_slices)[(0, slice(None), *slicer)]
    assert torch.allclose(out_half.float(), reference.float(), atol=1e-5, rtol=0)
    assert torch.equal(out_half.half(), reference)  # same float16 arithmetic: bit for bit

    fp32 = PatchAggregation(num_classes, patch_size, blend="local")
    out_fp32 = fp32(garbage_global, local, all_slices)[(0, slice(None), *slicer)]
    assert out_fp32.dtype == torch.float32
    # No direct fp32-vs-predictor comparison: nnU-Net's float16 accumulators flush the Gaussian tails
    # at the volume border to 0 (measured: 1-2 % of voxels off by > 2e-3, up to 0.49 here), so the
    # float32 path is checked against a float64 reconstruction from nnU-Net's helpers instead.

    # float64 reconstruction from nnU-Net's helpers (compute_steps + compute_gaussian)
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
    gauss = compute_gaussian(patch_size, 1 / 8, 1, torch.float64, torch.device("cpu"))
    acc = torch.zeros(num_classes, *padded.shape[2:], dtype=torch.float64)
    norm = torch.zeros(padded.shape[2:], dtype=torch.float64)
    steps = compute_steps_for_sliding_window(tuple(padded.shape[2:]), patch_size, 0.5)
    for i, start in enumerate(itertools.product(*steps)):
        s = tuple(slice(a, a + p) for a, p in zip(start, patch_size))
        acc[(slice(None), *s)] += local[0, i].double() * gauss
        norm[s] += gauss
    expected = (acc / norm)[(slice(None), *slicer)]
    assert torch.allclose(out_fp32.double(), expected, atol=1e-5, rtol=0)


def test_learned_blend_formula_uncovered_global_and_alpha_gradient():
    patch_size, num_classes = (4, 4, 4), 2
    aggregation = PatchAggregation(num_classes, patch_size, init_global_weight=0.25)
    with torch.no_grad():
        aggregation.alpha.copy_(torch.tensor([-1.0, 2.0]))
    global_logits = torch.randn(1, num_classes, 8, 6, 4)
    local = torch.randn(1, 2, num_classes, *patch_size, requires_grad=True)
    slices = [[(slice(0, 4), slice(0, 4), slice(0, 4)), (slice(2, 6), slice(2, 6), slice(0, 4))]]
    out = aggregation(global_logits, local, slices)

    gauss = gaussian_patch_weights(patch_size)
    acc = torch.zeros(num_classes, 8, 6, 4)
    norm = torch.zeros(8, 6, 4)
    for k, s in enumerate(slices[0]):
        acc[(slice(None), *s)] += local[0, k].detach() * gauss
        norm[s] += gauss
    covered = norm > 0
    w = torch.sigmoid(torch.tensor([-1.0, 2.0])).view(-1, 1, 1, 1)
    expected = torch.where(covered, w * global_logits[0] + (1 - w) * acc / norm.clamp_min(1e-12), global_logits[0])
    assert torch.allclose(out[0], expected, atol=1e-5)
    assert torch.equal(out[0][:, ~covered], global_logits[0][:, ~covered])  # every uncovered voxel = global
    assert (~covered).any()
    assert torch.allclose(aggregation.local_weight, 1 - w.flatten())

    out.square().sum().backward()
    assert aggregation.alpha.grad is not None and aggregation.alpha.grad.abs().min() > 0
    assert torch.isfinite(local.grad).all() and local.grad.abs().sum() > 0


def test_global_blend_and_input_validation():
    aggregation = PatchAggregation(2, (4, 4, 4), blend="global")
    global_logits = torch.randn(1, 2, 8, 8, 8)
    local = torch.randn(1, 1, 2, 4, 4, 4)
    assert torch.equal(aggregation(global_logits, local, [[(slice(0, 4),) * 3]]), global_logits)
    local_mode = PatchAggregation(2, (4, 4, 4), blend="local")
    with pytest.raises(ValueError, match="patch slices"):
        local_mode(global_logits, local, [[(slice(0, 3),) * 3]])
    with pytest.raises(ValueError, match="inside the volume"):
        local_mode(global_logits, local, [[(slice(6, 10),) * 3]])
    with pytest.raises(ValueError, match="patch_slices must hold"):
        local_mode(global_logits, local, [[]])
    with pytest.raises(ValueError, match="blend"):
        PatchAggregation(2, (4, 4, 4), blend="sum")
    with pytest.raises(ValueError, match="init_global_weight"):
        PatchAggregation(2, (4, 4, 4), init_global_weight=1.0)


@pytest.mark.parametrize("blend", ["learned", "local"])
@pytest.mark.parametrize("accumulation_dtype", [torch.float32, torch.float16])
def test_in_place_blend_equals_out_of_place(blend, accumulation_dtype):
    """Inference blends into the global logits in place (no full-size temporaries): same numbers as
    the autograd-friendly form, covered and uncovered voxels alike; refused when gradients are needed."""
    torch.manual_seed(0)
    aggregation = PatchAggregation(3, (4, 4, 4), blend=blend, init_global_weight=0.3,
                                   accumulation_dtype=accumulation_dtype)
    global_logits = torch.randn(1, 3, 8, 6, 4)
    local = torch.randn(1, 2, 3, 4, 4, 4)
    slices = [[(slice(0, 4), slice(0, 4), slice(0, 4)), (slice(2, 6), slice(2, 6), slice(0, 4))]]
    with torch.no_grad():
        expected = aggregation.blend_sums(global_logits, *aggregation.accumulate(local, slices, (8, 6, 4)))
        target = global_logits.clone()
        result = aggregation.blend_sums(target, *aggregation.accumulate(local, slices, (8, 6, 4)), in_place=True)
    assert result is target
    assert torch.allclose(result, expected, atol=1e-6)
    assert torch.equal(result[:, :, 6:], global_logits[:, :, 6:])  # not covered by a patch
    assert not torch.equal(result[:, :, :4, :4], global_logits[:, :, :4, :4])
    if blend == "learned":
        with pytest.raises(RuntimeError, match="in_place=True\\) is for inference"):
            aggregation.blend_sums(global_logits.clone(), *aggregation.accumulate(local, slices, (8, 6, 4)),
                                   in_place=True)
