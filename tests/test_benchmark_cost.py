"""count_parameters, count_flops, PeakMemory and measure against values computed by hand."""
import pytest
import torch

from nnunet_moe.benchmark.cost import PeakMemory, count_flops, count_parameters, measure

MB = 1_000_000


def test_count_parameters_known_modules():
    linear = torch.nn.Linear(64, 32)
    assert count_parameters(linear) == 64 * 32 + 32
    conv = torch.nn.Conv3d(2, 4, kernel_size=3)
    model = torch.nn.Sequential(conv, torch.nn.InstanceNorm3d(4, affine=True), torch.nn.Conv3d(4, 1, 1, bias=False))
    assert count_parameters(model) == (2 * 4 * 27 + 4) + (4 + 4) + 4
    model[0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 4 + 8 + 4
    # a tensor shared between two submodules is counted once
    tied = torch.nn.Sequential(linear, torch.nn.Linear(64, 32))
    tied[1].weight = linear.weight
    assert count_parameters(tied) == 64 * 32 + 32 + 32
    with pytest.raises(ValueError, match="torch.nn.Module"):
        count_parameters(lambda x: x)


def test_count_flops_linear_is_two_times_macs():
    assert count_flops(torch.nn.Linear(64, 32), torch.zeros(10, 64)) == 2 * 10 * 64 * 32


def test_count_flops_conv3d():
    conv = torch.nn.Conv3d(2, 4, kernel_size=3, padding=1)
    # output 1 x 4 x (4, 5, 6); each output element: 2 input channels * 27 taps MACs
    assert count_flops(conv, torch.zeros(1, 2, 4, 5, 6)) == 2 * (4 * 4 * 5 * 6) * (2 * 27)
    strided = torch.nn.Conv3d(3, 8, kernel_size=2, stride=2, groups=1)
    # output 2 x 8 x (2, 2, 2); 3 * 8 MACs per output element
    assert count_flops(strided, torch.zeros(2, 3, 4, 4, 4)) == 2 * (2 * 8 * 8) * (3 * 8)


def test_count_flops_runs_without_grad():
    seen = []

    def fn(x):
        seen.append(torch.is_grad_enabled())
        return x @ x

    assert count_flops(fn, torch.zeros(3, 3)) == 2 * 3 * 3 * 3
    assert seen == [False]


def test_measure_cpu_peak_memory_of_a_known_tensor():
    def allocate(n):
        buffer = torch.empty(n, dtype=torch.float32)
        buffer.fill_(1.0)
        return None

    result = measure(allocate, 2 * MB, device="cpu", repeats=2, warmup=1)
    size = 2 * MB * 4  # 8 MB
    assert size <= result["peak_memory_bytes"] < 2 * size + 64 * 1024
    assert result["device_peak_memory_bytes"] is None
    assert len(result["seconds_all"]) == 2
    assert result["seconds"] == pytest.approx(sum(result["seconds_all"]) / 2)
    assert all(s > 0 for s in result["seconds_all"])


def test_measure_cpu_peak_is_a_peak_not_a_total_and_ignores_memory_held_before():
    def allocate_free_allocate():
        first = torch.ones(MB, dtype=torch.float32)  # 4 MB
        del first
        second = torch.ones(MB // 2, dtype=torch.float32)  # 2 MB, after the first is freed
        del second

    peak = measure(allocate_free_allocate, device="cpu")["peak_memory_bytes"]
    assert 4 * MB <= peak < 4 * MB + 64 * 1024  # not 6 MB
    held = torch.ones(4 * MB)  # 16 MB alive before and during the call: not counted
    assert measure(lambda x: None, held, device="cpu")["peak_memory_bytes"] < 64 * 1024


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, device="cpu", repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        measure(lambda: None, device="cpu", warmup=-1)
    with pytest.raises(ValueError, match="callable"):
        measure(3, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            measure(lambda: None, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_cuda_peak_memory_of_a_known_tensor():
    def allocate(n):
        buffer = torch.empty(n, dtype=torch.float32, device="cuda")
        buffer.fill_(1.0)

    result = measure(allocate, 2 * MB, device="cuda", repeats=2)
    size = 2 * MB * 4
    assert size <= result["peak_memory_bytes"] < 2 * size + 2 * 1024 * 1024
    assert result["device_peak_memory_bytes"] >= result["peak_memory_bytes"]


def test_peak_memory_meter_kinds_on_cpu():
    with PeakMemory("cpu") as tensors:
        buffer = torch.ones(2 * MB)  # 8 MB of torch tensor memory
        del buffer
    assert 8 * MB <= tensors.peak_bytes < 8 * MB + 64 * 1024 and tensors.absolute_peak_bytes is None
    with PeakMemory("cpu", kind="rss") as rss:
        buffer = torch.ones(16 * MB)  # 64 MB, touched: resident
        del buffer
    assert rss.peak_bytes >= 60 * MB and "RSS" in rss.method
    with pytest.raises(ValueError, match="kind must be one of"):
        PeakMemory("cpu", kind="heap")
