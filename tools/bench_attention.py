"""Benchmark LoRASelfAttention forward: local-window heads (O(N * w)) against global softmax heads (O(N^2)).

Each (mode, N) runs in a fresh Python subprocess (``--worker``) so that one run's memory high-water mark
cannot leak into the next. Setting: eval mode, ``torch.no_grad()``, fp32, batch 1, causal, LoRA r=8 on
q, k, v, o, dropout 0. ``local`` = every head local (n_local_attn_heads = heads, window w);
``global`` = every head global softmax (n_local_attn_heads = 0).

What is measured, per (mode, N):

* ms: median wall time of ``--repeats`` forwards after ``--warmup`` untimed ones (time.perf_counter).
* peak MB: high-water mark of live torch tensor bytes *allocated during one forward* (input, weights and
  everything allocated before the call excluded; the output included), from the CPU profiler's memory
  events (``torch.profiler.profile(profile_memory=True)``): every allocation and free is replayed in time
  order and the maximum running sum is taken. This is exact for tensor storage, independent of malloc
  caching, and ignores non-tensor memory (library scratch buffers, Python objects).
* rss MB: cross-check, ``ru_maxrss`` after the forward minus ``ru_maxrss`` before it, in the fresh process,
  measured before anything else at that N runs (a tiny forward at N = w first initialises the thread pool
  and kernels so their one-off memory stays in the baseline). It can read lower than peak MB when
  allocations reuse pages freed earlier, and higher when the allocator keeps extra pages.

Usage::

    python tools/bench_attention.py                     # table on stdout
    python tools/bench_attention.py --json bench.json   # also save rows + settings as JSON
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

DEFAULT_NS = (512, 1024, 2048, 4096, 8192)


def build_module(args: argparse.Namespace, mode: str) -> torch.nn.Module:
    """LoRASelfAttention in eval mode with all-local or all-global-softmax heads."""
    from lora_export.model.attention import LoRASelfAttention

    torch.manual_seed(0)
    return LoRASelfAttention(
        dim=args.dim,
        heads=args.heads,
        dim_head=args.dim_head,
        r=8,
        lora_alpha=16,
        causal=True,
        n_local_attn_heads=args.heads if mode == "local" else 0,
        local_attn_window_size=args.window,
        global_attn="softmax",
        attn_dropout=0.0,
        dropout=0.0,
    ).eval()


def maxrss_mb() -> float:
    """This process's resident-set high-water mark in MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def profiled_peak_mb(module: torch.nn.Module, x: torch.Tensor) -> float:
    """Peak live tensor bytes allocated during one forward, from the profiler's alloc/free events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = module(x)
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one (mode, N) in this (fresh) process and return the row."""
    torch.set_num_threads(args.threads)
    module = build_module(args, args.mode)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, args.n, args.dim, generator=gen)
    with torch.no_grad():
        module(torch.randn(1, args.window, args.dim, generator=gen))  # one-off library initialisation
        gc.collect()
        rss_before = maxrss_mb()
        out = module(x)
        rss_delta = maxrss_mb() - rss_before
        assert out.shape == x.shape and torch.isfinite(out).all()
        del out
        peak = profiled_peak_mb(module, x)
        for _ in range(args.warmup):
            module(x)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    return {
        "mode": args.mode,
        "n": args.n,
        "ms": ms,
        "ms_min": min(times),
        "ms_per_n": ms / args.n,
        "peak_mb": peak,
        "mb_per_n": peak / args.n,
        "rss_mb": rss_delta,
    }


def run_one(args: argparse.Namespace, mode: str, n: int) -> dict[str, Any]:
    """Run ``worker`` for (mode, n) in a fresh subprocess and parse its JSON line."""
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--n", str(n)]
    for name in ("dim", "heads", "dim_head", "window", "repeats", "warmup", "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {mode} N={n} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table: mode, N, ms, ms/N, peak MB, MB/N, rss MB."""
    header = f"{'mode':<7}{'N':>6}{'ms':>10}{'ms/N':>10}{'peak MB':>10}{'MB/N':>9}{'rss MB':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['mode']:<7}{r['n']:>6}{r['ms']:>10.2f}{r['ms_per_n']:>10.5f}"
                     f"{r['peak_mb']:>10.1f}{r['mb_per_n']:>9.4f}{r['rss_mb']:>9.1f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=list(DEFAULT_NS), help="sequence lengths")
    parser.add_argument("--global-max-n", type=int, default=4096, help="largest N for the global heads")
    parser.add_argument("--no-global", action="store_true", help="skip the global-softmax contrast")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--window", type=int, default=128, help="local window w")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable timings on a shared CPU)")
    parser.add_argument("--json", metavar="PATH", help="save rows and settings as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["local", "global"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    runs = [("local", n) for n in args.ns]
    if not args.no_global:
        runs += [("global", n) for n in args.ns if n <= args.global_max_n]
    rows = []
    for mode, n in runs:
        rows.append(run_one(args, mode, n))
        print(f"  {mode} N={n}: {rows[-1]['ms']:.2f} ms, {rows[-1]['peak_mb']:.1f} MB", file=sys.stderr, flush=True)
    print(f"LoRASelfAttention forward, eval/no_grad, fp32, batch 1, causal, dim={args.dim}, heads={args.heads}, "
          f"dim_head={args.dim_head}, w={args.window}, threads={args.threads}, torch {torch.__version__}")
    print(format_table(rows))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("worker", "mode", "n", "json")}
        meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "peak_mb": "profiler alloc/free high-water mark of tensors allocated in one forward",
                "rss_mb": "ru_maxrss delta over one forward in a fresh process"}
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
