"""Unit tests of NMSWPredictor (NMSW inside nnU-Net's predictor, no sliding window) and of the hooks that give
nnU-Net's own predictor instances its behaviour: options, mirroring, device fall-back, fp16 logits, step size,
checkpoint mismatches, and that nothing leaks into other predictors. Tiny synthetic models; the stock
commands in a fresh process are in test_nmsw_e2e.py."""
import copy
import itertools

import pytest
import torch

from nmsw_fixtures import (NUM_CLASSES, CountCalls, make_predictor, planned_nmsw, tiny_conv, tiny_nmsw,
                           write_model_folder)
from nnunet_moe.inference.nmsw_predictor import (CALLS, K_ENV, LOG_PREFIX, NOISE_ENV, TTA_ENV, NMSWPredictor,
                                                 nmsw_k_from_env, nmsw_prediction, options_from_env, tta_from_env)
from nnunet_moe.inference.nmsw_predictor import test_noise_from_env as noise_from_env
from nnunet_moe.networks.nmsw import NMSWNet


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (K_ENV, NOISE_ENV, TTA_ENV):
        monkeypatch.delenv(name, raising=False)


def mirrored(network, volume, k, axes):
    """nnU-Net's _internal_maybe_mirror_and_predict order: plain pass, then every flip combination, averaged."""
    out = network.predict(volume[None], k=k)
    combos = [c for i in range(len(axes)) for c in itertools.combinations([a + 2 for a in axes], i + 1)]
    for dims in combos:
        out += torch.flip(network.predict(torch.flip(volume[None], dims), k=k), dims)
    return (out / (len(combos) + 1))[0]


# ----------------------------------------------------------------------------- options
def test_env_options_are_parsed_once_with_clear_errors(monkeypatch):
    assert nmsw_k_from_env() == 5 and options_from_env() == {"nmsw_k": None, "nmsw_test_noise": False,
                                                               "nmsw_mirroring": True}
    monkeypatch.setenv(K_ENV, " 30 ")
    monkeypatch.setenv(NOISE_ENV, "1")
    monkeypatch.setenv(TTA_ENV, "0")
    assert options_from_env() == {"nmsw_k": 30, "nmsw_test_noise": True, "nmsw_mirroring": False}
    for bad, match in (("0", "NNUNET_MOE_NMSW_K='0': the number of local patches K must be >= 1"),
                       ("-3", ">= 1"), ("five", "NNUNET_MOE_NMSW_K='five' is not an integer"),
                       ("2.5", "not an integer")):
        monkeypatch.setenv(K_ENV, bad)
        with pytest.raises(ValueError, match=match):
            options_from_env()
    monkeypatch.setenv(NOISE_ENV, "maybe")
    with pytest.raises(ValueError, match="NNUNET_MOE_NMSW_TEST_NOISE='maybe' is not a switch; use 1 or 0"):
        noise_from_env()
    monkeypatch.setenv(TTA_ENV, "2")
    with pytest.raises(ValueError, match="NNUNET_MOE_NMSW_TTA='2' is not a switch; use 1 or 0"):
        tta_from_env()
    for bad in (0, -1, 2.5, True, "5"):
        with pytest.raises(ValueError, match=r"nmsw_k=.*must be a positive integer"):
            NMSWPredictor(device=torch.device("cpu"), nmsw_k=bad)


# ----------------------------------------------------------------------------- prediction
def test_nmsw_network_takes_predict_not_the_sliding_window(capsys):
    network = tiny_nmsw(infer_only_foreground=False)
    network.local_net = CountCalls(network.local_net)
    predictor = make_predictor(network, cls=NMSWPredictor, nmsw_k=3)
    volume = torch.randn(1, 20, 16, 12)  # grid 4 x 3 x 2 = 24 cells
    before = CALLS["nmsw"]
    logits = predictor.predict_sliding_window_return_logits(volume)
    assert CALLS["nmsw"] == before + 1
    assert network.local_net.batches == [1, 1, 1]  # exactly K local patches, one per pass, no tiles
    # fp16 like nnU-Net's sliding window, equal to NMSWNet.predict for the same K
    assert logits.dtype == torch.float16 and logits.shape == (NUM_CLASSES, 20, 16, 12)
    assert torch.equal(logits, network.predict(volume, k=3).half())
    out = capsys.readouterr().out
    assert (f"{LOG_PREFIX} volume (20, 16, 12): global pass + top-K=3 local patches (patch (8, 8, 8), "
            f"1 mirror pass(es), Gumbel noise off), no sliding window\n") in out
    predictor.nmsw_k = 1000  # K larger than the grid: clamped to its 24 cells
    network.local_net.batches.clear()
    predictor.predict_sliding_window_return_logits(volume)
    assert network.local_net.batches == [1] * 24
    predictor.nmsw_k = None  # None: the network's own k_infer
    network.local_net.batches.clear()
    predictor.predict_sliding_window_return_logits(volume)
    assert network.local_net.batches == [1] * network.k_infer == [1] * 5


def test_mirroring_follows_use_mirroring_and_nmsw_mirroring(capsys):
    network = tiny_nmsw(infer_only_foreground=False)
    predictor = make_predictor(network, cls=NMSWPredictor, mirroring=True, axes=(0, 2))
    volume = torch.randn(1, 16, 12, 10)
    logits = predictor.predict_sliding_window_return_logits(volume)
    assert torch.allclose(logits.float(), mirrored(network, volume, 5, (0, 2)).half().float(), atol=1e-3)
    assert "4 mirror pass(es)" in capsys.readouterr().out  # axes (0, 2): 2^2 flips
    predictor.use_mirroring = False  # what nnUNetv2_predict --disable_tta sets
    assert torch.equal(predictor.predict_sliding_window_return_logits(volume), network.predict(volume, k=5).half())
    assert "1 mirror pass(es)" in capsys.readouterr().out
    predictor.use_mirroring, predictor.nmsw_mirroring = True, False  # NNUNET_MOE_NMSW_TTA=0: off for NMSW only
    assert torch.equal(predictor.predict_sliding_window_return_logits(volume), network.predict(volume, k=5).half())
    assert "1 mirror pass(es)" in capsys.readouterr().out
    assert predictor.use_mirroring is True and predictor.network is network  # restored after the call


def test_test_noise_option_and_step_size_statement(capsys):
    network = tiny_nmsw(infer_only_foreground=False)
    predictor = make_predictor(network, cls=NMSWPredictor, nmsw_k=2, tile_step_size=0.7)
    volume = torch.randn(1, 16, 12, 10)
    clean = predictor.predict_sliding_window_return_logits(volume)
    assert torch.equal(clean, predictor.predict_sliding_window_return_logits(volume))  # deterministic top-K
    assert "no sliding window; -step_size 0.7 does not apply (the candidate-patch grid step 0.5 is part of the " \
           "network)" in capsys.readouterr().out
    assert torch.equal(clean, make_predictor(network, cls=NMSWPredictor, nmsw_k=2)
                       .predict_sliding_window_return_logits(volume))  # the step size changes nothing
    predictor.nmsw_test_noise = True
    torch.manual_seed(0)
    noisy = [predictor.predict_sliding_window_return_logits(volume) for _ in range(6)]
    assert any(not torch.equal(n, clean) for n in noisy)
    assert "Gumbel noise on" in capsys.readouterr().out
    assert network.topk.noise_at_eval is False  # the network's own setting is restored


def test_device_error_falls_back_to_results_on_the_cpu(monkeypatch, capsys):
    """nnU-Net's fall-back: an error on the device (CUDA out of memory) -> the same prediction again with the
    results on the CPU; the retry runs NMSW once more, nothing else."""
    network = tiny_nmsw(infer_only_foreground=False)
    predictor = make_predictor(network, cls=NMSWPredictor, nmsw_k=2)
    predictor.perform_everything_on_device = True  # nnU-Net's CUDA setting; the fall-back logic is device-agnostic
    volume = torch.randn(1, 16, 12, 10)
    expected = network.predict(volume, k=2).half()
    calls, original_predict = [], NMSWNet.predict

    def predict_out_of_memory_once(self, x, k=None):
        calls.append(k)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original_predict(self, x, k=k)

    inner = []
    original_inner = NMSWPredictor._internal_predict_sliding_window_return_logits

    def spy(self, data, slicers, do_on_device=True):
        inner.append((do_on_device, len(slicers)))
        return original_inner(self, data, slicers, do_on_device)

    monkeypatch.setattr(NMSWNet, "predict", predict_out_of_memory_once)
    monkeypatch.setattr(NMSWPredictor, "_internal_predict_sliding_window_return_logits", spy)
    logits = predictor.predict_sliding_window_return_logits(volume)
    assert inner == [(True, 1), (False, 1)] and calls == [2, 2]  # one whole-volume tile per attempt
    assert "Prediction on device was unsuccessful" in capsys.readouterr().out
    assert torch.equal(logits, expected) and logits.device.type == "cpu"
    assert predictor.network is network


def test_volume_smaller_than_one_patch_is_padded_by_nnunet():
    """nnU-Net pads the volume to the patch (centred) before NMSW sees it and crops the logits again."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    network = tiny_nmsw(infer_only_foreground=False)
    predictor = make_predictor(network, cls=NMSWPredictor)
    volume = torch.randn(1, 5, 6, 7)
    logits = predictor.predict_sliding_window_return_logits(volume)
    assert logits.shape == (NUM_CLASSES, 5, 6, 7) and torch.isfinite(logits).all()
    padded, revert = pad_nd_image(volume, (8, 8, 8), "constant", {"value": 0}, True, None)
    assert torch.equal(logits, network.predict(padded, k=5).half()[(slice(None), *revert[1:])])


# ----------------------------------------------------------------------------- nothing leaks
def _sliding_window_tiles(shape, patch=(8, 8, 8), step=0.5):
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    steps = compute_steps_for_sliding_window(shape, patch, step)
    return len(steps[0]) * len(steps[1]) * len(steps[2])


def test_plain_predictors_keep_the_sliding_window_after_an_nmsw_prediction(tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    # every nnU-Net method NMSWPredictor overrides, and the one that calls the sliding window
    names = [n for n in vars(NMSWPredictor) if callable(vars(NMSWPredictor)[n]) and n in vars(nnUNetPredictor)]
    names.append("predict_logits_from_preprocessed_data")
    assert "predict_sliding_window_return_logits" in names and "_internal_get_sliding_window_slicers" in names
    methods = {n: vars(nnUNetPredictor)[n] for n in names}
    bystander = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)  # exists during the NMSW load
    network = planned_nmsw()
    folder = write_model_folder(tmp_path, "nnUNetTrainerNMSW", "nnUNetTrainerNMSW", network.state_dict())
    loaded = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False, use_mirroring=False)
    loaded.initialize_from_trained_model_folder(folder, (0,))
    assert isinstance(loaded, NMSWPredictor)  # this instance only (other hooks may add their own subclass)
    loaded.predict_logits_from_preprocessed_data(torch.randn(1, 20, 16, 12))

    plain = CountCalls(tiny_conv(2)).eval()
    for predictor in (bystander, make_predictor(plain)):
        assert type(predictor) is nnUNetPredictor
        predictor.manual_initialization(plain, loaded.plans_manager, loaded.configuration_manager, None,
                                        loaded.dataset_json, "nnUNetTrainer", (0, 1, 2))
        predictor.use_mirroring = False
        plain.batches.clear()
        logits = predictor.predict_sliding_window_return_logits(torch.randn(1, 12, 10, 9))
        assert logits.shape == (NUM_CLASSES, 12, 10, 9)
        assert plain.batches == [1] * _sliding_window_tiles((12, 10, 9)) == [1] * 8  # tiles, not NMSW
    assert {n: vars(nnUNetPredictor)[n] for n in names} == methods  # nnU-Net's class is never changed
    assert all(m.__module__ == "nnunetv2.inference.predict_from_raw_data" for m in methods.values())


def test_adopted_predictor_reads_env_once_and_changes_back_for_other_networks(tmp_path, monkeypatch):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    network = planned_nmsw()
    nmsw_folder = write_model_folder(tmp_path / "a", "nnUNetTrainerNMSW", "nnUNetTrainerNMSW", network.state_dict())
    plain_folder = write_model_folder(tmp_path / "b", "nnUNetTrainer", "nnUNetTrainer",
                                      copy.deepcopy(network.local_net.state_dict()))
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    monkeypatch.setenv(K_ENV, "0")  # a bad value: clear error, the predictor stays nnU-Net's
    with pytest.raises(ValueError, match="NNUNET_MOE_NMSW_K='0': the number of local patches K must be >= 1"):
        predictor.initialize_from_trained_model_folder(nmsw_folder, (0,))
    assert not isinstance(predictor, NMSWPredictor)
    monkeypatch.setenv(K_ENV, "2")
    monkeypatch.setenv(TTA_ENV, "0")
    predictor.initialize_from_trained_model_folder(nmsw_folder, (0,))
    assert isinstance(predictor, NMSWPredictor) and (predictor.nmsw_k, predictor.nmsw_mirroring) == (2, False)
    monkeypatch.setenv(K_ENV, "7")  # parsed once, when the checkpoint was loaded
    network.local_net = CountCalls(network.local_net)
    predictor.network.local_net = network.local_net
    predictor.list_of_parameters = [predictor.network.state_dict()]
    predictor.predict_logits_from_preprocessed_data(torch.randn(1, 20, 16, 12))
    assert network.local_net.batches == [1, 1]
    predictor.initialize_from_trained_model_folder(plain_folder, (0,))  # a plain model: nnU-Net's class again
    assert not isinstance(predictor, NMSWPredictor) and isinstance(predictor, nnUNetPredictor)
    assert "nmsw_k" not in vars(predictor)


def test_nmsw_prediction_context_is_undone_after_an_exception():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    network = tiny_nmsw(infer_only_foreground=False)
    predictor = make_predictor(network)
    volume = torch.randn(1, 16, 12, 10)
    with pytest.raises(RuntimeError, match="inside the block"):
        with nmsw_prediction(predictor, nmsw_k=2) as same:
            assert same is predictor and type(predictor) is NMSWPredictor and predictor.nmsw_k == 2
            assert torch.equal(predictor.predict_sliding_window_return_logits(volume),
                               network.predict(volume, k=2).half())
            raise RuntimeError("inside the block")
    assert type(predictor) is nnUNetPredictor
    assert not {"nmsw_k", "nmsw_test_noise", "nmsw_mirroring"} & set(vars(predictor))
    configured = make_predictor(network, cls=NMSWPredictor, nmsw_k=7, nmsw_test_noise=True)
    with nmsw_prediction(configured, nmsw_k=3):
        assert (configured.nmsw_k, configured.nmsw_test_noise) == (3, True)  # unnamed options kept
    assert type(configured) is NMSWPredictor and configured.nmsw_k == 7
    with pytest.raises(TypeError, match=r"unknown NMSW option\(s\) \['k'\]"):
        with nmsw_prediction(predictor, k=3):
            pass


# ----------------------------------------------------------------------------- checkpoint mismatches
def test_checkpoint_mismatches_are_clear_errors(tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    network = planned_nmsw()
    plain_weights = copy.deepcopy(network.local_net.state_dict())
    # 1) checkpoint claims NMSW but holds plain nnU-Net weights (a plain nnU-Net predictor, as nnUNetv2_predict)
    folder = write_model_folder(tmp_path / "a", "nnUNetTrainerNMSW", "nnUNetTrainerNMSW", plain_weights)
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    with pytest.raises(ValueError, match=r"checkpoint .*a/nnUNetTrainerNMSW__nnUNetPlans__3d_fullres/fold_0/"
                                         r"checkpoint_final\.pth was written by trainer 'nnUNetTrainerNMSW' \(an "
                                         r"NMSW-Net trainer\) but its weights do not fit"):
        predictor.initialize_from_trained_model_folder(folder, (0,))
    assert not isinstance(predictor, NMSWPredictor)
    # 2) NMSW results folder holding a checkpoint written by nnU-Net's default trainer (NMSWPredictor API)
    folder = write_model_folder(tmp_path / "b", "nnUNetTrainerNMSW_1epochs_5iters", "nnUNetTrainer", plain_weights)
    with pytest.raises(ValueError, match=r"belongs to NMSW trainer 'nnUNetTrainerNMSW_1epochs_5iters', but its "
                                         r"checkpoint .*fold_0/checkpoint_final\.pth was written by trainer "
                                         r"'nnUNetTrainer', which builds a PlainConvUNet"):
        NMSWPredictor(device=torch.device("cpu"), allow_tqdm=False).initialize_from_trained_model_folder(folder, (0,))
    # 3) a matching NMSW checkpoint loads and predicts with NMSW
    folder = write_model_folder(tmp_path / "c", "nnUNetTrainerNMSW", "nnUNetTrainerNMSW", network.state_dict())
    predictor = NMSWPredictor(device=torch.device("cpu"), allow_tqdm=False, use_mirroring=False, nmsw_k=4)
    predictor.initialize_from_trained_model_folder(folder, (0,))
    assert isinstance(predictor.network, NMSWNet) and predictor.nmsw_k == 4  # its own options stay
    before = CALLS["nmsw"]
    logits = predictor.predict_logits_from_preprocessed_data(torch.randn(1, 20, 16, 12))
    assert logits.shape == (NUM_CLASSES, 20, 16, 12) and CALLS["nmsw"] == before + 1


def test_subclassed_predictor_keeps_its_methods_below_nmsw(tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class Mine(nnUNetPredictor):
        def mine(self):
            return "mine"

    folder = write_model_folder(tmp_path, "nnUNetTrainerNMSW", "nnUNetTrainerNMSW", planned_nmsw().state_dict())
    predictor = Mine(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, (0,))
    assert isinstance(predictor, NMSWPredictor) and isinstance(predictor, Mine) and predictor.mine() == "mine"
    second = Mine(device=torch.device("cpu"), allow_tqdm=False)
    second.initialize_from_trained_model_folder(folder, (0,))
    assert type(second) is type(predictor)  # one class per predictor class, not one per instance


def test_benchmark_nmsw_mode_gives_the_predictor_nmsw_for_the_mode_only(monkeypatch):
    from types import SimpleNamespace

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_moe.benchmark.modes import MODES

    network = tiny_nmsw(infer_only_foreground=False)
    predictor = make_predictor(network)  # as the benchmark builds untrained models: nnU-Net's class
    monkeypatch.setenv(NOISE_ENV, "1")
    monkeypatch.setenv(K_ENV, "9")
    with MODES["nmsw"].active(predictor, SimpleNamespace(nmsw_k=2)) as used:
        assert used is network and isinstance(predictor, NMSWPredictor)
        assert (predictor.nmsw_k, predictor.nmsw_test_noise) == (2, True)  # --nmsw-k over the variable
    assert type(predictor) is nnUNetPredictor
    with MODES["nmsw"].active(predictor, SimpleNamespace(nmsw_k=None)):
        assert predictor.nmsw_k == 9
