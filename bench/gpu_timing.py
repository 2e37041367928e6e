"""Timing and comparison helpers shared by the GPU benchmarks (``kernels.py``, ``gemm_speed.py``).

Imported by the scripts as a sibling module (``python bench/<script>.py`` puts ``bench/`` on the
path); never installed.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
from collections.abc import Callable, Sequence

import torch
import triton.testing

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def randn(*shape: int, dtype: torch.dtype = torch.bfloat16, std: float = 1.0) -> torch.Tensor:
    """Random (never zero) inputs on the benchmark device."""
    return (torch.randn(*shape, device=DEV) * std).to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64."""
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).norm() / b64.norm())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.reshape(-1).contiguous(), b.reshape(-1).contiguous()
    return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))


def bench(
    fn: Callable[..., object], sets: Sequence[tuple], *, warmup: int = 25, rep: int = 150
) -> float:
    """Median ms of ``fn(*sets[i])``, i rotating; ``do_bench`` flushes L2 before each call."""
    counter = itertools.count()

    def call() -> None:
        fn(*sets[next(counter) % len(sets)])

    return float(triton.testing.do_bench(call, warmup=warmup, rep=rep, return_mode="median"))


def bench_stream(fn: Callable[..., object], sets: Sequence[tuple], n: int = 12) -> float:
    """Median ms per call of ``n`` back-to-back calls (events around them, inputs rotated): the
    throughput a model sees when the host runs ahead of the GPU, launch gaps included."""
    for i in range(3):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(n):
            fn(*sets[i % len(sets)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return sorted(times)[len(times) // 2]


def bench_graph(fn: Callable[..., object], sets: Sequence[tuple], n: int = 12) -> float:
    """Median ms per call of CUDA-graph replays (one graph per input set, rotated): device time
    without the host's launch overhead, as a graph-captured runtime would see it."""
    for st in sets:
        fn(*st)
    torch.cuda.synchronize()
    graphs = []
    for st in sets:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(*st)
        graphs.append(graph)
    return bench_stream(lambda g: g.replay(), [(g,) for g in graphs], n)


def start_precompile(
    worker: Callable[[tuple], str], jobs: Sequence[tuple], workers: int
) -> list[concurrent.futures.Future]:
    """Run ``worker(job)`` for every job in spawned processes (each compiles Triton kernels by
    launching them; Triton's disk cache is shared), while the caller goes on checking."""
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn")
    )
    futures = [pool.submit(worker, job) for job in jobs]
    pool.shutdown(wait=False)
    print(f"precompile: {len(jobs)} jobs on {workers} workers", flush=True)
    return futures


def wait_precompile(futures: Sequence[concurrent.futures.Future]) -> None:
    for fut in futures:
        try:
            print(f"precompiled {fut.result(timeout=240)}", flush=True)
        except Exception as exc:
            print(f"!! precompile: {exc!r}"[:300], flush=True)
