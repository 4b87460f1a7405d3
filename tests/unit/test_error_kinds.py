"""bench/error_kinds.py: the first gold equation an output misses, by kind."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PATH = Path(__file__).resolve().parents[2] / "bench" / "error_kinds.py"
spec = importlib.util.spec_from_file_location("error_kinds", PATH)
error_kinds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(error_kinds)

STEPS = [{"left": 3, "op": "+", "right": 8, "result": 11}, {"left": 11, "op": "*", "right": 4, "result": 44}]


def test_each_kind_of_first_error():
    kind = error_kinds.error_kind
    assert kind("so 3 + 8 = 11 crayons, then 11 * 4 = 44.", STEPS) == "ok"
    assert kind("3 + 8 = 11; 11 x 4 = 44; 44 - 1 = 43", STEPS) == "extra steps"  # x reads as *
    assert kind("3 + 8 = 12; 12 * 4 = 48", STEPS) == "arithmetic"
    assert kind("3 + 6 = 9; 9 * 4 = 36", STEPS) == "right operand"
    assert kind("3 + 8 = 11; 12 * 4 = 48", STEPS) == "left operand"
    assert kind("3 + 8 = 11; 11 + 4 = 15", STEPS) == "operation"
    assert kind("3 + 8 = 11, so the answer is 11", STEPS) == "stopped early"
