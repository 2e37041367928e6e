"""The pack's cost at ComfyUI start-up, and a clean import log.

ComfyUI times each custom node pack's import (entry point and node list included) and logs it
as ``Import times for custom nodes``; that line is the pack's own cost. The wall-clock start-up
with and without the pack is printed too, for the record: on a shared 2-core machine it varies
by more than the budget, so it is not asserted.
"""

from __future__ import annotations

import re

from .harness import ComfyServer

BUDGET_S = 0.5
ANSI = re.compile(r"\x1b\[[0-9;]*m")
IMPORT_LINE = re.compile(r"(\d+\.\d+) seconds( \(IMPORT FAILED\))?: (.+)$")


def import_times(log: str) -> dict[str, tuple[float, bool]]:
    """``pack folder name -> (seconds, failed)`` from ComfyUI's import-times block."""
    times = {}
    for line in ANSI.sub("", log).splitlines():
        m = IMPORT_LINE.search(line)
        if m:
            times[m.group(3).rstrip("/").rsplit("/", 1)[-1]] = (float(m.group(1)), bool(m.group(2)))
    return times


def test_pack_adds_under_half_a_second_and_logs_no_import_error() -> None:
    with ComfyServer(with_pack=False) as stock:
        stock_s = stock.startup_s
        stock_log = stock.log
    with ComfyServer() as packed:
        packed_s = packed.startup_s
        log = ANSI.sub("", packed.log)
        registered = set(packed.get("/object_info"))
    assert stock_s is not None and packed_s is not None
    seconds, failed = import_times(log)["comfyui-quantizer"]
    print(
        f"pack import {seconds:.1f} s (ComfyUI's 0.1 s resolution); start-up "
        f"{stock_s:.2f} s without the pack, {packed_s:.2f} s with it "
        f"(difference {packed_s - stock_s:+.2f} s)"
    )
    assert not failed
    assert seconds < BUDGET_S
    assert {"QuantizerLoadModel", "QuantizerQuantize", "QuantizerSave"} <= registered
    ours = [line for line in log.splitlines() if re.search("quantizer", line, re.I)]
    bad = [line for line in ours if re.search(r"error|fail|traceback|skip|warn", line, re.I)]
    assert not bad, bad
    # Nothing the stock server does not also log: no new error or traceback lines.
    stock_lines = set(ANSI.sub("", stock_log).splitlines())
    new = {line for line in log.splitlines() if re.search(r"error|traceback", line, re.I)}
    new -= stock_lines
    assert not new, new
