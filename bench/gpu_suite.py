"""Everything that needs a GPU, in one device call.

    bash bench/gpu.sh bench/gpu_suite.py [--skip NAME ...]

Runs, each in its own process with a time limit, and in this order:
  1. the unit tests on CUDA (CUDA-only tests run; kernel tests run on the hardware);
  2. ``bench/learned_rounding.py --gpu``: learned rounding on a 3072x12288 layer vs our RTN;
  3. ``bench/gemm_speed.py``: the block-scaled linear full paths and issue 7's Flux-shaped step;
  4. ``bench/kernels.py --quick``: every kernel checked against its PyTorch reference at DiT sizes,
     then the quantize kernels vs a device-to-device copy and the GEMMs vs bf16 (issue 5).
The limits add up to more than one device call allows: ``--skip`` what was measured already.
Full logs go to ``$OUT/suite.log``, each script's JSON to ``$OUT``; the tail of each part is
printed, with the card's name, so that the call's output alone carries the numbers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The unit tests on real CUDA: kernel tests then run on the hardware, not in the interpreter.
# test_packaging checks a pip install, which the GPU machine does not have.
UNIT = ["tests/unit", "--ignore=tests/unit/test_packaging.py", "-p", "no:cacheprovider"]
PARTS = {
    "unit-on-gpu": ([sys.executable, "-m", "pytest", "-q", "-rs", *UNIT], 150, 25),
    "learned": ([sys.executable, "bench/learned_rounding.py", "--gpu"], 150, 30),
    "gemm_speed": ([sys.executable, "bench/gemm_speed.py", "--budget-s", "120"], 200, 45),
    "kernels": ([sys.executable, "bench/kernels.py", "--quick"], 240, 40),
}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip", nargs="*", default=[], choices=list(PARTS))
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "suite.log").open("w")
    status = {}
    for name, (cmd, limit, tail) in PARTS.items():
        if name in args.skip:
            continue
        started = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
            text, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as e:
            text = (
                (e.stdout or b"").decode(errors="replace")
                if isinstance(e.stdout, bytes)
                else (e.stdout or "")
            )
            code = f"timeout after {limit} s"
        seconds = time.monotonic() - started
        status[name] = (code, seconds)
        log.write(f"===== {name} (exit {code}, {seconds:.0f} s)\n{text}\n")
        log.flush()
        print(f"===== {name} (exit {code}, {seconds:.0f} s)")
        print("\n".join(text.rstrip().splitlines()[-tail:]))
    print("===== suite")
    for name, (code, seconds) in status.items():
        print(f"{name:<12} exit {code}  {seconds:6.0f} s")
    return 0 if all(code == 0 for code, _ in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
