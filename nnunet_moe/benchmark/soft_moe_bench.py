"""Benchmark: fused (scaled_dot_product_attention) versus materialised Soft MoE, and a Swin SMT training step.

Usage::

    python -m nnunet_moe.benchmark.soft_moe_bench [--device cpu] [--tokens 4096 16384 32768] [--widths 192 384]

Part 1 runs one forward pass of :class:`nnunet_moe.layers.soft_moe.SoftMoE` (dynamic slots, 32 experts,
batch 1, no autograd) through the layer itself ("fused": dispatch and combine as unit-scale attention)
and through a textbook implementation that materialises the ``N x E*S`` logits and both softmaxes
("reference"), and reports time, peak memory and the largest absolute output difference.
Part 2 times one forward+backward step of Swin SMT (32 experts) and of the dense SwinUNETR of equal width
(``SwinSMT(num_experts=0)``, MONAI's SwinUNETR modules) at the smallest Swin-valid size at or above the
hippocampus demo patch 40x56x40 (64x64x64), feature size 48, batch 2, 1 channel, 3 classes.

Every measurement runs in a fresh subprocess so that allocator caches of earlier runs do not count.
Peak memory: ``cost.PeakMemory(device, kind="rss")`` around the measured call, started after inputs and
model exist: on CPU the peak resident set size minus the resident size at that moment, i.e. what the
call added at its peak, everything the process allocated included; on CUDA
``torch.cuda.max_memory_allocated`` minus the allocation before the call.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

from nnunet_moe.benchmark.cost import PeakMemory

_WORKER_FLAG = "--_worker"


# --------------------------------------------------------------------------------------------- memory
def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------------------ soft moe
def materialised_soft_moe(layer, x):
    """Soft MoE with the ``(B, N, E*S)`` logits, dispatch and combine weights held in memory."""
    import torch

    b, n, d = x.shape
    keys, values, slot_queries = layer.routing(x)
    logits = torch.einsum("bnd,bmd->bnm", keys, slot_queries)
    dispatch = logits.softmax(dim=1)
    combine = logits.softmax(dim=2)
    del logits
    slot_inputs = torch.einsum("bnm,bnd->bmd", dispatch, values)
    slot_outputs = layer.experts(slot_inputs.view(b, layer.num_experts, -1, d)).reshape(b, -1, d)
    return torch.einsum("bnm,bmd->bnd", combine, slot_outputs)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker_soft_moe(cfg: dict) -> dict:
    import torch

    from nnunet_moe.layers.soft_moe import SoftMoE

    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    layer = SoftMoE(cfg["width"], cfg["experts"]).to(device).eval()
    x = torch.randn(1, cfg["tokens"], cfg["width"], device=device)
    run = layer if cfg["impl"] == "fused" else (lambda t: materialised_soft_moe(layer, t))
    with torch.no_grad():
        run(torch.randn(1, 64, cfg["width"], device=device))  # warm-up of the code path on a tiny input
        with PeakMemory(device, kind="rss") as mem:
            start = time.perf_counter()
            out = run(x)
            _sync(device)
            seconds = time.perf_counter() - start
        result = {"seconds": seconds, "peak_bytes": mem.peak_bytes, "method": mem.method}
        if cfg["impl"] == "reference":
            result["max_abs_diff"] = (out - layer(x)).abs().max().item()
    return result


def _worker_train_step(cfg: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from nnunet_moe.networks.swin_smt import SwinSMT

    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    net = SwinSMT(in_channels=1, out_channels=3, feature_size=cfg["feature_size"], num_experts=cfg["experts"],
                  use_v2=cfg["use_v2"]).to(device).train()
    x = torch.randn(cfg["batch"], 1, *cfg["size"], device=device)
    target = torch.randint(0, 3, (cfg["batch"], *cfg["size"]), device=device)
    times = []
    with PeakMemory(device, kind="rss") as mem:
        for _ in range(cfg["steps"]):
            net.zero_grad(set_to_none=False)
            start = time.perf_counter()
            F.cross_entropy(net(x), target).backward()
            _sync(device)
            times.append(time.perf_counter() - start)
    later = times[1:] or times
    return {
        "seconds": sorted(later)[len(later) // 2],
        "all_seconds": times,
        "peak_bytes": mem.peak_bytes,
        "method": mem.method,
        "params": sum(p.numel() for p in net.parameters()),
    }


def _run_worker(cfg: dict) -> dict:
    cmd = [sys.executable, "-m", "nnunet_moe.benchmark.soft_moe_bench", _WORKER_FLAG, json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"worker failed (exit {proc.returncode}): {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main
def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f}"


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768], help="token counts N")
    p.add_argument("--widths", type=int, nargs="+", default=[192, 384], help="token widths d")
    p.add_argument("--experts", type=int, default=32, help="experts in the Soft MoE layer (default 32)")
    p.add_argument("--max-reference-fraction", type=float, default=0.8,
                   help="skip the materialised reference when its logits would need more than this fraction "
                        "of the available memory (default 0.8)")
    p.add_argument("--skip-train-step", action="store_true", help="only benchmark the Soft MoE layer")
    p.add_argument("--train-size", type=int, nargs=3, default=[64, 64, 64], help="training-step input size")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=2, help="steps per model; the first is a warm-up for timing")
    p.add_argument("--train-experts", type=int, default=32)
    p.add_argument("--feature-size", type=int, default=48)
    p.add_argument("--use-v2", action="store_true", help="use MONAI's SwinUNETR-V2 blocks in the training step")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [_WORKER_FLAG]:
        cfg = json.loads(argv[1])
        result = _worker_soft_moe(cfg) if cfg["kind"] == "soft_moe" else _worker_train_step(cfg)
        print(json.dumps(result))
        return 0
    args = _parse_args(argv)
    import torch

    from nnunet_moe.networks.swin_smt import validate_swin_input_shape

    validate_swin_input_shape(args.train_size)
    device = torch.device(args.device)
    print(f"# Soft MoE benchmark ({device}, torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print(f"Soft MoE forward, dynamic slots, {args.experts} experts, batch 1, no autograd; "
          "fused = the layer (scaled_dot_product_attention), reference = materialised logits.\n")
    print("| tokens | width | fused s | fused peak MiB | reference s | reference peak MiB | memory ratio | time ratio | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    method = ""
    for n in args.tokens:
        for d in args.widths:
            base = {"kind": "soft_moe", "device": args.device, "tokens": n, "width": d, "experts": args.experts}
            fused = _run_worker({**base, "impl": "fused"})
            slots = args.experts * math.ceil(n / args.experts)
            need = 3 * n * slots * 4  # logits, dispatch and combine weights in float32
            available = _available_memory_bytes() if device.type == "cpu" else torch.cuda.get_device_properties(device).total_memory
            if available is not None and need > args.max_reference_fraction * available:
                ref = {"error": f"skipped: needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"}
            else:
                ref = _run_worker({**base, "impl": "reference"})
            method = fused.get("method", method)
            f_s = f"{fused['seconds']:.2f}" if "seconds" in fused else fused["error"]
            f_m = _mib(fused["peak_bytes"]) if "peak_bytes" in fused else "-"
            if "error" in ref:
                print(f"| {n} | {d} | {f_s} | {f_m} | {ref['error']} | - | - | - | - |")
                continue
            mem_ratio = ref["peak_bytes"] / max(fused.get("peak_bytes", 0), 1)
            time_ratio = ref["seconds"] / fused["seconds"] if "seconds" in fused else float("nan")
            print(f"| {n} | {d} | {f_s} | {f_m} | {ref['seconds']:.2f} | {_mib(ref['peak_bytes'])} | "
                  f"{mem_ratio:.1f}x | {time_ratio:.2f}x | {ref['max_abs_diff']:.2e} |")
    print(f"\nPeak memory: {method}; the extra memory of the call over the resident size before it.")

    if not args.skip_train_step:
        size = "x".join(map(str, args.train_size))
        print(f"\n## One training step (forward + backward, cross-entropy), input {args.train_batch}x1x{size}, "
              f"feature size {args.feature_size}, 3 classes{', SwinUNETR-V2 blocks' if args.use_v2 else ''}\n")
        print("| network | parameters | step s | step times s | peak MiB |")
        print("|---|---:|---:|---|---:|")
        rows = {}
        for name, experts in (("dense SwinUNETR (num_experts=0)", 0), (f"Swin SMT ({args.train_experts} experts)", args.train_experts)):
            cfg = {"kind": "train", "device": args.device, "experts": experts, "feature_size": args.feature_size,
                   "use_v2": args.use_v2, "batch": args.train_batch, "size": args.train_size, "steps": args.train_steps}
            r = rows[name] = _run_worker(cfg)
            if "error" in r:
                print(f"| {name} | - | {r['error']} | - | - |")
            else:
                times = ", ".join(f"{t:.1f}" for t in r["all_seconds"])
                print(f"| {name} | {r['params']:,} | {r['seconds']:.2f} | {times} | {_mib(r['peak_bytes'])} |")
        dense_r, smt_r = rows.values()
        if "error" not in dense_r and "error" not in smt_r:
            print(f"\nSwin SMT / dense: time {smt_r['seconds'] / dense_r['seconds']:.2f}x, "
                  f"peak memory {smt_r['peak_bytes'] / max(dense_r['peak_bytes'], 1):.2f}x "
                  f"(step time: median of the steps after the first; peak memory over all steps, "
                  f"gradients included).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
