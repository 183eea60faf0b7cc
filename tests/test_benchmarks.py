"""Regression guard: every benchmark runs (``run_all.py --quick``); what is counted or measured (not timed) holds.

Timing ratios live in the benchmarks only (a shared CI machine makes timed bounds flaky): here the quick run proves
the scripts work, and the checks are memory (peak RSS of a training step, each strategy alone in its own process),
outputs (merged = unmerged) and the layers a task switch touches (counted).
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import HANG

pytestmark = pytest.mark.slow  # the benchmark scripts end to end: about 2.5 minutes on 2 cores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--quick", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: run["result"] for name, run in json.loads(out.read_text())["runs"].items()}


def test_training_memory_stays_close_to_full_fine_tuning(runs):
    assert runs["train_step"]["taps_over_full"] > 0  # the step benchmark ran (its ratio is not checked here)
    # Without re-forming W_base + dW in the backward this is ~1.07 (the formed weights stay saved); now ~1.037.
    assert runs["memory"]["taps_peak_over_full"] <= 1.06


def test_merged_and_unmerged_inference_agree(runs):
    assert runs["inference"]["checks"]["max_abs_diff_merged_vs_unmerged"] == 0.0


def test_task_switches_touch_only_the_two_tasks_layers(runs):
    assert runs["switch"]["checks"]["switches_beyond_active_sets"] == 0
