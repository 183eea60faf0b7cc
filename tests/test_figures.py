"""The figure scripts draw from what the main job writes (no training here)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fig2_draws_accuracy_against_task_specific_layers(tmp_path):
    rows = [{"task": t, "lam": lam, "accuracy": acc, "active_layers": k, "total_layers": 49, "adapter_bytes": 1}
            for t in ("digit rotation", "digits on photos") for lam, acc, k in ((0.1, 0.8, 30), (1, 0.7, 10))]
    (tmp_path / "lam_sweep.json").write_text(json.dumps({"config": {}, "rows": rows}))
    task = {"taps": 0.78, "active_layers": 16, "total_layers": 49, "full_ft": 0.9, "head_only": 0.6,
            "fixed_layers": {"last": 0.7, "first": 0.5, "random": 0.6}}
    (tmp_path / "results.json").write_text(json.dumps({"tasks": {"digit rotation": task}}))
    out = tmp_path / "fig2.png"
    subprocess.run([sys.executable, str(ROOT / "examples" / "fig2.py"), "--sweep", str(tmp_path / "lam_sweep.json"),
                    "--results", str(tmp_path / "results.json"), "--out", str(out)], check=True, timeout=120)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_fig2_merges_the_references_of_one_seed_and_refuses_two_seeds():
    spec = importlib.util.spec_from_file_location("fig2", ROOT / "examples" / "fig2.py")
    fig2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fig2)
    full = {"protocol": {"seed": 1}, "tasks": {"t": {"taps": 0.9, "full_ft": 0.95, "head_only": 0.5}}}
    fixed = {"protocol": {"seed": 1}, "tasks": {"t": {"taps": 0.8, "fixed_layers": {"last": 0.7}}}}
    assert fig2.merge([full, fixed])["tasks"]["t"] == {"taps": 0.9, "full_ft": 0.95, "head_only": 0.5,
                                                       "fixed_layers": {"last": 0.7}}
    with pytest.raises(SystemExit, match=r"mixes seeds \[1, 2\]"):
        fig2.merge([full, {"protocol": {"seed": 2}, "tasks": {}}])
