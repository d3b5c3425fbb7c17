"""Cost measurements shared by every benchmark in nnunet-moe: parameters, FLOPs, time, memory.

The seed papers report cost as parameter count, FLOPs (Swin-UMamba Table 2, NMSW-Net Table I)
and inference seconds (NMSW-Net, Swin SMT); none reports memory.
These helpers measure the same quantities on any ``torch.nn.Module`` or callable:

* ``count_parameters(module)``: number of parameter elements (shared tensors counted once).
* ``count_flops(fn, *args)``: FLOPs of one call under ``torch.utils.flop_counter.FlopCounterMode``
  without autograd. Torch's convention: a multiply-accumulate counts as 2 FLOPs, so a matmul of
  (M, K) by (K, N) is 2*M*K*N and a convolution is 2 * output elements * C_in/groups * kernel
  volume. Only the operators torch has formulas for are counted (matmul, bmm, addmm, einsum via
  bmm, convolutions and their transposes, scaled-dot-product attention); bias additions,
  normalisations, activations and pooling add nothing.
* ``PeakMemory(device, kind=...)``: the one peak-memory meter of every benchmark here (CUDA: the
  caching allocator's peak; CPU: torch tensor allocations or the resident set size, see the class).
* ``measure(fn, *args, device=...)``: wall-clock seconds per call and peak memory (``PeakMemory``).
"""
from __future__ import annotations

import contextlib
import os
import sys
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


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 to /dev/null: the profiler's C++ side (kineto) writes two "USDT ...
    profiler_start/stop" lines to it on every use, whatever its log level, which would bury a progress bar."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def heap_in_use_bytes() -> int | None:
    """Bytes that the C allocator (glibc ``malloc``, which torch's and numpy's CPU memory come from) has handed
    out and not got back: ``mallinfo2``'s ``uordblks + hblkhd`` over all arenas; None without glibc >= 2.33.
    Unlike the RSS it leaves out memory that was freed and kept for reuse, so memory kept by mistake shows
    at once instead of after the allocator's reserve is used up."""
    import ctypes

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def resident_bytes() -> int | None:
    """The process's resident set size now (Linux ``VmRSS``); None where ``/proc/self/status`` does not exist."""
    try:
        return _proc_status_bytes("VmRSS")
    except OSError:
        return None


class PeakMemory:
    """Peak memory that the code inside ``with PeakMemory(device, kind) as meter:`` added: ``meter.peak_bytes``.

    On CUDA (either kind): ``torch.cuda.max_memory_allocated`` during the block minus
    ``memory_allocated`` at entry (peak statistics reset at entry); ``meter.absolute_peak_bytes`` is
    the absolute ``max_memory_allocated`` (weights and inputs included), the figure usually quoted as
    "peak GPU memory".

    On CPU ``kind`` says what is counted:

    * ``"tensors"`` (default): torch has no CPU allocator statistics, so the block runs under
      ``torch.profiler`` with ``profile_memory=True``, which records every CPU tensor allocation
      (+bytes) and release (-bytes); the peak of their running sum in time order is the peak of
      tensor memory allocated since entry. Memory held before (weights, inputs) is not counted,
      tensors freed inside lower the sum, memory outside torch's allocator (numpy arrays, Python
      objects) is not seen. The profiler slows the block: do not time it. File descriptor 2 is
      silenced during the block (kineto's start/stop lines). ``absolute_peak_bytes`` is None.
    * ``"rss"``: the peak resident set size (Linux: ``VmHWM``, reset to the current size through
      ``/proc/self/clear_refs`` at entry) minus the resident size at entry: everything the process
      added, numpy buffers and the Python heap included. Memory that an allocator kept from earlier
      calls is reused without growing the RSS, so measure in a fresh process. ``absolute_peak_bytes``
      is the peak resident size itself.
    """

    KINDS = ("tensors", "rss")

    def __init__(self, device, kind: str = "tensors"):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}; got {kind!r}")
        self.device = torch.device(device)
        self.kind = kind
        self.peak_bytes = None
        self.absolute_peak_bytes = None
        if self.device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated above the allocation at the start"
        elif kind == "tensors":
            self.method = "peak of torch's CPU tensor allocations above the start (profiler memory events)"
        else:
            self.method = "peak RSS above the RSS at the start (VmHWM reset via /proc/self/clear_refs)"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.kind == "tensors":
            from torch.profiler import ProfilerActivity, profile

            self._silenced = _stderr_silenced()
            self._silenced.__enter__()
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as refs:
                    refs.write("5")  # resets VmHWM to the current RSS
            except OSError as error:
                raise RuntimeError(f"kind='rss' needs Linux's /proc/self/clear_refs ({error})") from error
            self._start = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.absolute_peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.peak_bytes = self.absolute_peak_bytes - int(self._start)
        elif self.kind == "tensors":
            try:
                self._profiler.__exit__(*exc)
            finally:
                self._silenced.__exit__(*exc)
            # kineto_results holds every recorded event, the allocation/release records among them
            events = [e for e in self._profiler.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
            self.peak_bytes = _peak_of_running_sum(events)
        else:
            self.absolute_peak_bytes = _proc_status_bytes("VmHWM")
            self.peak_bytes = max(0, self.absolute_peak_bytes - self._start)
        return False


def _peak_of_running_sum(events) -> int:
    running, peak = 0, 0
    # start_ns() is in torch >= 2.2; older releases only have start_us()
    start = (lambda e: e.start_ns()) if events and hasattr(events[0], "start_ns") else (lambda e: e.start_us())
    for event in sorted(events, key=start):
        running += int(event.nbytes())
        peak = max(peak, running)
    return peak


def measure(fn: Callable, *args, device, repeats: int = 1, warmup: int = 0, memory: bool = True) -> dict:
    """Time ``fn(*args)`` and measure its peak memory, under ``torch.no_grad()``.

    Args:
        fn: the callable, e.g. a model or a ``predict_case`` function; its arguments must
            already be on ``device``.
        device: "cpu", "cuda", "cuda:0" or a ``torch.device``.
        repeats: timed calls; ``seconds`` is their mean.
        warmup: untimed calls first (kernel selection, caches, lazy initialisation).
        memory: False skips the CPU memory call (``peak_memory_bytes`` is then None on CPU); on CUDA
            the peak costs nothing and is always measured.

    Returns:
        ``{"seconds": mean seconds per call, "seconds_all": [seconds of each timed call],
        "peak_memory_bytes": int | None, "device_peak_memory_bytes": int | None, "device": str}``.

        ``seconds`` come from ``time.perf_counter`` around each call, with
        ``torch.cuda.synchronize`` before and after it on CUDA (kernels run asynchronously).

        ``peak_memory_bytes`` is ``PeakMemory(device, kind="tensors")``: the peak of tensor memory
        allocated by torch during a call, above what was allocated when the call started. On CUDA
        the meter spans the timed calls (their maximum); on CPU it needs the profiler, so it is one
        extra, untimed call after the timed ones, so that profiling does not slow the timing.
        ``device_peak_memory_bytes`` is the meter's ``absolute_peak_bytes`` (CUDA: weights and
        inputs included; None on CPU).
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
    meter = PeakMemory(device)
    seconds_all = []
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        with meter if on_cuda else contextlib.nullcontext():
            for _ in range(repeats):
                if on_cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                fn(*args)
                if on_cuda:
                    torch.cuda.synchronize(device)
                seconds_all.append(time.perf_counter() - start)
        if not on_cuda and memory:
            with meter:
                fn(*args)
    return {
        "seconds": sum(seconds_all) / len(seconds_all),
        "seconds_all": seconds_all,
        "peak_memory_bytes": meter.peak_bytes,
        "device_peak_memory_bytes": meter.absolute_peak_bytes,
        "device": str(device),
    }
