"""Joint multi-task TAPS (taps_peft.training.multitask): Eq. 4 training, save/load, the shared-then-incremental variant, DDP.

A random-init timm ViT (16x16 inputs, patch 8, depth 1, width 32) and two synthetic tasks with 2 and 3 classes, so
the per-task heads have different shapes. Torch runs with one thread (the shared 2-core machine).
"""

import json
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("timm")
pytest.importorskip("accelerate")

import taps_peft  # noqa: E402
from taps_peft.tuner import layer as taps_layer  # noqa: E402
from taps_peft.training import (  # noqa: E402
    base_state_dict, load_joint, save_joint, train_joint, train_shared_then_incremental,
)
from conftest import HANG, REPO, subprocess_env  # noqa: E402


TASKS = ("task1", "task2")


def make_base():
    import timm

    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=16, patch_size=8,
                             depth=1, embed_dim=32, num_heads=2)


def make_tasks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 16, 16, generator=g)
    y1 = (x[:, 0].mean((1, 2)) > 0).long()
    y2 = torch.bucketize(x[:, 1].mean((1, 2)), torch.tensor([-0.05, 0.05]))
    return {"task1": (x, y1), "task2": (x, y2)}


def make_heads():
    torch.manual_seed(2)
    return {"task1": nn.Linear(32, 2), "task2": nn.Linear(32, 3)}


class Recorder:
    """A loss function that records, per call, the active task, whether idle tasks' gradients are None, the model."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, batch):
        peft_model = getattr(model, "module", model)
        active = peft_model.active_adapter
        layer = next(m for m in peft_model.modules() if isinstance(m, taps_layer.TAPSLayer))
        idle_none = all(layer.taps_delta[t].grad is None for t in layer.taps_delta if t != active)
        self.calls.append((active, idle_none, type(model).__name__))
        return nn.functional.cross_entropy(model(batch[0]), batch[1])



@pytest.fixture(scope="module")
def joint():
    from accelerate import Accelerator, DistributedDataParallelKwargs

    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    calls = {"prepare": 0, "backward": 0}
    prepare, backward = accelerator.prepare, accelerator.backward
    accelerator.prepare = lambda *a: (calls.__setitem__("prepare", calls["prepare"] + len(a)), prepare(*a))[1]
    accelerator.backward = lambda loss: (calls.__setitem__("backward", calls["backward"] + 1), backward(loss))[1]
    before = make_base().state_dict()
    recorder = Recorder()
    model = train_joint(make_base(), make_tasks(), taps_peft.TAPSConfig(lam=0.5, score_lr=5e-2), 6,
                        heads=make_heads(), batch_size=8, lr=1e-2, loss_fn=recorder, accelerator=accelerator)
    return model, before, recorder.calls, calls


def test_joint_trains_shared_base_and_every_task(joint):
    model, before, calls, accel = joint
    assert [c[0] for c in calls] == list(TASKS) * 6  # round-robin, one task per batch and optimizer step
    assert all(idle_none for _, idle_none, _ in calls)  # idle tasks' gradients stay None: the optimizer skips them
    assert accel == {"prepare": 2 + len(TASKS), "backward": 12}  # model, optimizer, one loader per task

    after = base_state_dict(model)
    assert sorted(after) == sorted(before)  # the plain model's names
    gated = [n for n, _ in model.base_model.taps_layers()]
    for name in gated:  # train_base="gated": the shared weights of every gated layer moved, the rest did not
        assert not torch.equal(after[f"{name}.weight"], before[f"{name}.weight"]), name
    for key in ("patch_embed.proj.weight", "pos_embed", "head.weight", "norm.weight"):
        assert torch.equal(after[key], before[key]), key

    heads = make_heads()
    for t in TASKS:
        layers = dict(model.base_model.taps_layers())
        assert all(bool(m.taps_delta[t].abs().sum() > 0) for m in layers.values()), t
        assert all(m.taps_scores[t].item() != pytest.approx(0.15) for m in layers.values()), t
        head = model.base_model.model.head.modules_to_save[t]
        assert head.weight.shape == heads[t].weight.shape and not torch.equal(head.weight, heads[t].weight)
        norm = model.base_model.model.norm.modules_to_save[t]
        assert not torch.equal(norm.weight, before["norm.weight"]), t
    scores = {t: [m.taps_scores[t].item() for _, m in model.base_model.taps_layers()] for t in TASKS}
    assert scores["task1"] != scores["task2"]


def test_save_joint_then_load_joint_reproduces_each_task(joint, tmp_path):
    model, *_ = joint
    save_joint(model, tmp_path / "run")
    save_joint(model, tmp_path / "run")  # overwriting is fine
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == ["base", *TASKS]  # no temp left
    assert [p.name for p in (tmp_path / "run/base").iterdir()] == ["model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run/base/model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["taps_tasks"]) == list(TASKS)
    x = make_tasks()["task1"][0]
    for t, classes in zip(TASKS, (2, 3)):
        model.set_adapter(t)
        model.eval()
        with torch.no_grad():
            expected = model(x)
        loaded = load_joint(make_base, tmp_path / "run", t)
        assert (tmp_path / "run" / t / "adapter_model.safetensors").is_file()
        with torch.no_grad():
            got = loaded(x)
        assert got.shape == (len(x), classes) and torch.equal(got, expected), t
        assert taps_peft.taps_summary(loaded, t)["active_layers"] == taps_peft.taps_summary(model, t)["active_layers"]
    model.train()


def test_mixed_schedule_trains_all_of_the_base():
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = []
    handle = register_optimizer_step_post_hook(lambda *a: steps.append(1))
    try:
        recorder = Recorder()
        before = make_base().state_dict()
        model = train_joint(make_base(), make_tasks(), taps_peft.TAPSConfig(), 3, heads=make_heads(),
                            schedule="mixed", train_base="all", batch_size=8, loss_fn=recorder)
    finally:
        handle.remove()
    assert [c[0] for c in recorder.calls] == list(TASKS) * 3 and len(steps) == 3  # one step per round of K batches
    after = base_state_dict(model)
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight"):
        assert not torch.equal(after[key], before[key]), key
    assert torch.equal(after["head.weight"], before["head.weight"])  # the base head is unused: tasks have their own


def test_shared_then_incremental():
    recorder, frozen = Recorder(), {}

    def loss_fn(model, batch):  # stage 1 runs the plain model, stage 2 the PeftModel: note its base on first sight
        if hasattr(model, "peft_config") and not frozen:
            frozen.update({k: v.clone() for k, v in base_state_dict(model).items()})
        return recorder(model, batch) if frozen else nn.functional.cross_entropy(model(batch[0]), batch[1])

    before = make_base().state_dict()
    model = train_shared_then_incremental(make_base(), make_tasks(), taps_peft.TAPSConfig(), 3, shared_steps=4,
                                          heads=make_heads(), batch_size=8, loss_fn=loss_fn)
    assert list(model.peft_config) == list(TASKS) and [c[0] for c in recorder.calls] == list(TASKS) * 3
    after = base_state_dict(model)
    for key in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"):  # stage 1: everything
        assert not torch.equal(after[key], before[key]), key
    assert all(torch.equal(after[k], frozen[k]) for k in after)  # stage 2: the shared network stays frozen
    assert torch.equal(after["head.weight"], before["head.weight"])  # the model's own head is put back
    heads = make_heads()
    for t in TASKS:  # each task's TAPS head starts from its stage-1 head, not from the initial one
        head = model.base_model.model.head.modules_to_save[t]
        assert head.weight.shape == heads[t].weight.shape and not torch.equal(head.weight, heads[t].weight)


def test_bad_arguments():
    with pytest.raises(ValueError, match="train_base"):
        train_joint(make_base(), make_tasks(), taps_peft.TAPSConfig(), 1, train_base="some")
    with pytest.raises(ValueError, match="'base'"):
        train_joint(make_base(), {"base": make_tasks()["task1"]}, taps_peft.TAPSConfig(), 1)
    with pytest.raises(ValueError, match="schedule"):
        train_joint(make_base(), make_tasks(), taps_peft.TAPSConfig(), 1, schedule="random")


def test_joint_demo_tiny_budget(tmp_path):
    """examples/joint_demo.py end to end on a few steps: the table's JSON, both saved joint runs, the reload check."""
    for module in ("skimage", "sklearn", "matplotlib"):
        pytest.importorskip(module)
    import importlib.util

    spec = importlib.util.spec_from_file_location("joint_demo", REPO / "examples" / "joint_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    report = demo.main(["--steps", "4", "--base-steps", "4", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(report))
    assert list(report["strategies"]) == ["incremental", "joint", "shared_then_incremental"]
    for strategy in report["strategies"].values():
        assert len(strategy["tasks"]) == 4 and 0 <= strategy["mean_k_over_L"] <= 1
        rows = strategy["tasks"].values()
        assert all(r["total_layers"] == 16 and len(r["layers"]) == r["active_layers"] for r in rows)
    for run in ("joint", "shared_then_incremental"):
        assert (tmp_path / run / "base" / "model.safetensors").is_file()
        assert len(list((tmp_path / run).glob("*/adapter_model.safetensors"))) == 4


DDP_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
import taps_peft
from accelerate import Accelerator, DistributedDataParallelKwargs
from taps_peft.training import base_state_dict, train_joint, train_shared_then_incremental
from test_multitask import make_base, make_heads, make_tasks
torch.set_num_threads(1)
acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
before = make_base().state_dict()
try:  # DDP without find_unused_parameters would hang or fail on the first step: refused up front
    train_joint(make_base(), make_tasks(), taps_peft.TAPSConfig(), 1, accelerator=Accelerator(cpu=True))
except ValueError as err:
    refused = "find_unused_parameters=True" in str(err)
for schedule in ("round_robin", "mixed", "shared"):
    train = train_shared_then_incremental if schedule == "shared" else train_joint
    model = train(make_base(), make_tasks(), taps_peft.TAPSConfig(lam=0.5), 3, heads=make_heads(), batch_size=8,
                  accelerator=acc, **({{}} if schedule == "shared" else {{"schedule": schedule}}))
    after = base_state_dict(model)
    open(f"state_{{schedule}}_{{acc.process_index}}.json", "w").write(json.dumps({{
        "rank": acc.process_index, "world": acc.num_processes, "schedule": schedule,
        "ddp": torch.distributed.is_initialized(), "refused": refused,
        "base_moved": not torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"]),
        "state": {{k: v.double().sum().item() for k, v in model.state_dict().items()}},
    }}))
acc.wait_for_everyone()
acc.end_training()
sys.stdout.flush()
import os

from conftest import HANG
os._exit(0)  # gloo can abort at interpreter exit (design/environment.md): leave before it tears down
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_stay_in_sync(tmp_path):
    """2 CPU processes through the real launcher: each rank sees other batches, so equal parameters on both ranks
    after training mean every used gradient (base, the active task's adapter, the summed mixed round, the shared
    variant's two stages) was all-reduced, with idle tasks' parameters left out by find_unused_parameters=True.
    (Without DDP's all-reduce the two ranks' parameters differ in 38 of 52 tensors after these 3 steps.)"""
    script = tmp_path / "ddp_joint.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests")))
    env = subprocess_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    proc = subprocess.run([*launch, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(p.read_text()) for p in tmp_path.glob("state_*.json")]  # a file per rank and schedule
    for schedule in ("round_robin", "mixed", "shared"):  # shared: train_shared_then_incremental
        ranks = {r["rank"]: r for r in rows if r["schedule"] == schedule}
        assert sorted(ranks) == [0, 1] and all(r["world"] == 2 and r["ddp"] and r["refused"] and r["base_moved"]
                                          for r in ranks.values())
        assert ranks[0]["state"] == pytest.approx(ranks[1]["state"], rel=1e-6, abs=1e-7), schedule
