"""FSDP2 (``torch.distributed.fsdp.fully_shard``, what Accelerate's FSDP2 plugin applies): 2 CPU ranks (gloo) train
a TAPS model with a layer budget like one process does, and the gathered full state dict saves as a normal adapter.

Accelerate runs FSDP only on GPUs (with ``ACCELERATE_USE_CPU`` it falls back to DDP), so this test shards with
torch directly, launched by ``torch.distributed.run``.
"""

import json
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel

import taps_peft  # noqa: F401  (registers TAPS)

from conftest import HANG, REPO, subprocess_env

timm = pytest.importorskip("timm")


SCRIPT = textwrap.dedent('''
    import copy, json, os, sys
    import torch, torch.distributed as dist, torch.nn.functional as F
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import timm, taps_peft
    from peft import get_peft_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), sys.argv[1]

    def build():
        torch.manual_seed(0)
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                embed_dim=32, num_heads=2, num_classes=5)
        return get_peft_model(vit, taps_peft.TAPSConfig(budget_layers=4, lam=0.0))  # lam adapts: gates read (gathered) per step

    model = build()
    single = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (2,))
    for block in model.base_model.model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def train(m, rows):
        m.peft_config["default"].score_lr = 0.02  # TAPS steps the (sharded) scores itself
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        losses = []
        for step in range(6):
            x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)
            loss = F.cross_entropy(m(x[rows]), y[rows]) + m.taps_penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    sharded_losses = train(model, slice(4 * rank, 4 * rank + 4))  # each rank half of the batch
    single_losses = train(single, slice(0, 8))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        gathered = build()
        gathered.load_state_dict(full)
        gathered.save_pretrained(os.path.join(out, "fsdp"))
        single.save_pretrained(os.path.join(out, "single"))
    summary = taps_peft.taps_summary(model)  # on every rank: reading sharded scores gathers them
    result = {"rank": rank, "losses": sharded_losses, "single": single_losses, "active": summary["active_layers"],
              "single_active": taps_peft.taps_summary(single)["active_layers"]}
    with open(os.path.join(out, f"result_{rank}.json"), "w") as f:  # not stdout: the ranks' lines can interleave
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo can abort at interpreter exit
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_ranks_train_like_one_process_and_save_an_adapter(tmp_path):
    script = tmp_path / "fsdp_train.py"
    script.write_text(SCRIPT)
    env = subprocess_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["rank"]: r for r in (json.loads(p.read_text()) for p in tmp_path.glob("result_*.json"))}
    assert sorted(results) == [0, 1]
    single = results[0]["single"]
    assert 0 < results[0]["active"] < 8  # the penalty closed some gates during the run (gates read when sharded)
    assert results[0]["active"] == results[1]["active"] == results[0]["single_active"]
    # FSDP averages the ranks' gradients of their half-batch mean losses: the full-batch gradient, as one process.
    mean = [(a + b) / 2 for a, b in zip(results[0]["losses"], results[1]["losses"])]
    assert mean == pytest.approx(single, rel=1e-4)

    x = torch.randn(4, 3, 32, 32)
    outs = {}
    for name in ["fsdp", "single"]:
        torch.manual_seed(0)
        base = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                 embed_dim=32, num_heads=2, num_classes=5)
        model = PeftModel.from_pretrained(base, tmp_path / name).eval()
        with torch.no_grad():
            outs[name] = model(x)
        assert taps_peft.taps_summary(model)["active_layers"] == results[0]["active"]
    torch.testing.assert_close(outs["fsdp"], outs["single"], rtol=1e-4, atol=1e-5)
