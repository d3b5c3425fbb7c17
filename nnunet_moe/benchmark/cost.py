"""Cost measurements shared by every benchmark in nnunet-moe: parameters, FLOPs, time, memory.

The seed papers report cost as parameter count, FLOPs (Swin-UMamba Table 2, NMSW-Net Table I)
and inference seconds (NMSW-Net, Swin SMT); none reports memory (PAPER_FACTS.md section 6).
These helpers measure the same quantities on any ``torch.nn.Module`` or callable:

* ``count_parameters(module)``: number of parameter elements (shared tensors counted once).
* ``count_flops(fn, *args)``: FLOPs of one call under ``torch.utils.flop_counter.FlopCounterMode``
  without autograd. Torch's convention: a multiply-accumulate counts as 2 FLOPs, so a matmul of
  (M, K) by (K, N) is 2*M*K*N and a convolution is 2 * output elements * C_in/groups * kernel
  volume. Only the operators torch has formulas for are counted (matmul, bmm, addmm, einsum via
  bmm, convolutions and their transposes, scaled-dot-product attention); bias additions,
  normalisations, activations and pooling add nothing.
* ``measure(fn, *args, device=...)``: wall-clock seconds per call and peak memory.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``module`` (only ``requires_grad`` ones if ``trainable_only``)."""
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"count_parameters needs a torch.nn.Module; got {type(module).__name__}")
    # module.parameters() already yields a tensor shared between submodules once
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only))


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """Total FLOPs (2 per multiply-accumulate, torch's convention) of one call ``fn(*args, **kwargs)``.

    The call runs under ``torch.no_grad()``, so only the forward computation is counted.
    """
    if not callable(fn):
        raise ValueError(f"count_flops needs a callable (a module or function); got {type(fn).__name__}")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def _cpu_peak_allocated_bytes(fn: Callable, args: tuple) -> int:
    """Peak bytes held by torch's CPU allocator during ``fn(*args)``, relative to the start.

    torch has no CPU allocator statistics, and the process's resident set size mixes in the
    Python heap, freed-but-cached pages and other threads. The profiler's memory events
    (``profile_memory=True``) record every CPU tensor allocation (+bytes) and release (-bytes)
    with a timestamp; the running sum of these, in time order, is the number of bytes allocated
    since the call began, and its maximum is the peak. Memory held before the call (weights,
    inputs) is not counted; tensors freed during the call lower the running sum.
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    # kineto_results holds every recorded event, the allocation/release records among them
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    return _peak_of_running_sum(events)


def _peak_of_running_sum(events) -> int:
    running, peak = 0, 0
    # start_ns() is in torch >= 2.2; older releases only have start_us()
    start = (lambda e: e.start_ns()) if events and hasattr(events[0], "start_ns") else (lambda e: e.start_us())
    for event in sorted(events, key=start):
        running += int(event.nbytes())
        peak = max(peak, running)
    return peak


def measure(fn: Callable, *args, device, repeats: int = 1, warmup: int = 0) -> dict:
    """Time ``fn(*args)`` and measure its peak memory, under ``torch.no_grad()``.

    Args:
        fn: the callable, e.g. a model or a ``predict_case`` function; its arguments must
            already be on ``device``.
        device: "cpu", "cuda", "cuda:0" or a ``torch.device``.
        repeats: timed calls; ``seconds`` is their mean.
        warmup: untimed calls first (kernel selection, caches, lazy initialisation).

    Returns:
        ``{"seconds": mean seconds per call, "seconds_all": [seconds of each timed call],
        "peak_memory_bytes": int, "device_peak_memory_bytes": int | None, "device": str}``.

        ``seconds`` come from ``time.perf_counter`` around each call, with
        ``torch.cuda.synchronize`` before and after it on CUDA (kernels run asynchronously).

        ``peak_memory_bytes`` is the peak of tensor memory allocated by torch during a call,
        above what was allocated when the call started, on both devices:
        on CUDA ``torch.cuda.max_memory_allocated() - memory_allocated()`` at the start, after
        ``reset_peak_memory_stats`` (maximum over the timed calls); on CPU the peak of the
        running sum of the profiler's allocation events (one extra, untimed call under
        ``torch.profiler`` after the timed ones, so that profiling does not slow the timing).
        Memory outside torch's allocator (numpy arrays, Python objects) is not counted.
        ``device_peak_memory_bytes`` is, on CUDA, the absolute ``max_memory_allocated()``
        (weights and inputs included), the figure usually quoted as "peak GPU memory"; it is
        None on CPU.
    """
    if not callable(fn):
        raise ValueError(f"measure needs a callable; got {type(fn).__name__}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device; got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {device} but torch.cuda.is_available() is False")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1; got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0; got {warmup!r}")

    on_cuda = device.type == "cuda"
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        if on_cuda:
            torch.cuda.synchronize(device)
            start_allocated = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        seconds_all = []
        for _ in range(repeats):
            if on_cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn(*args)
            if on_cuda:
                torch.cuda.synchronize(device)
            seconds_all.append(time.perf_counter() - start)

    if on_cuda:
        device_peak = int(torch.cuda.max_memory_allocated(device))
        peak = device_peak - int(start_allocated)
    else:
        device_peak = None
        peak = _cpu_peak_allocated_bytes(fn, args)
    return {
        "seconds": sum(seconds_all) / len(seconds_all),
        "seconds_all": seconds_all,
        "peak_memory_bytes": int(peak),
        "device_peak_memory_bytes": device_peak,
        "device": str(device),
    }
