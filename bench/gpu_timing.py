"""Timing and comparison helpers shared by the GPU benchmarks (``kernels.py``, ``gemm_speed.py``).

Imported by the scripts as a sibling module (``python bench/<script>.py`` puts ``bench/`` on the
path); never installed.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import math
import multiprocessing
import time
import traceback
from collections.abc import Callable, Sequence

import torch
import triton
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


class Record:
    """What one benchmark run found: ``data`` holds checks, timings, errors and skipped
    sections (written as JSON); every entry is printed as it comes, with the run's clock."""

    def __init__(self) -> None:
        self.data: dict[str, list[dict[str, object]]] = {
            "checks": [],
            "timings": [],
            "errors": [],
            "skipped": [],
        }
        self.t0 = time.perf_counter()

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    def guarded(self, name: str, fn: Callable[[], None], budget_s: float = math.inf) -> None:
        """Run one section unless the run's budget is spent; record a failure and go on
        (one broken item must not waste the device call)."""
        if time.perf_counter() - self.t0 > budget_s:
            self.data["skipped"].append({"section": name})
            self.log(f"-- SKIPPED {name} (budget)")
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:
            self.data["errors"].append({"section": name, "error": repr(exc)[:2000]})
            self.log(f"!! {name}: {exc!r}"[:2000])
            traceback.print_exc(limit=6)
        self.log(f"-- {name}: {time.perf_counter() - t0:.1f}s")

    def check(self, name: str, ok: bool, **info: object) -> None:
        self.data["checks"].append({"name": name, "ok": bool(ok), **info})
        self.log(f"{'ok  ' if ok else 'FAIL'} {name} {info if info else ''}")

    def timing(self, name: str, ms: float, **info: object) -> None:
        self.data["timings"].append({"name": name, "ms": ms, **info})
        self.log(f"time {name}: {ms * 1e3:.1f} us {info}")

    def env(self, **more: object) -> None:
        """The card and software versions, first in the JSON and in the log."""
        props = torch.cuda.get_device_properties(DEV)
        info = {
            "card": torch.cuda.get_device_name(DEV),
            "sms": props.multi_processor_count,
            "capability": list(torch.cuda.get_device_capability(DEV)),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton.__version__,
            **more,
        }
        self.data["env"] = [info]
        self.log(json.dumps(info))

    def card(self) -> str:
        return str(self.data["env"][0]["card"]) if self.data.get("env") else "?"

    def ok(self) -> bool:
        return not self.data["errors"] and all(c["ok"] for c in self.data["checks"])
