#!/usr/bin/env python
"""Task switching on one base model with N TAPS adapters loaded: time, bytes re-formed, adapter size on disk.

Adapters are made the way a user gets them: a TAPS model whose deltas are non-zero and whose scores put a seeded
random set of the gated layers at 0.15 >= tau (active) and the others at 0.05 < tau, saved with ``save_pretrained``
to a temporary folder, then served with ``PeftModel.from_pretrained(base, dir, adapter_name=...)`` and
``model.load_adapter(dir, adapter_name=...)`` (the real path; ``eval()``, ``torch.no_grad()``).

A switch from task A to task B is timed in two ways on the same model, interleaved (order rotated every round):

* ``unmerged``: ``set_adapter(B)`` + the first forward. Every unmerged forward forms ``W_base + dW`` for the active
  layers it needs and keeps nothing, so the first forward costs what a steady one does. ``overhead`` = set_adapter +
  first forward - a steady forward (the next one).
* ``merged``: ``unmerge_adapter()`` + ``set_adapter(B)`` + ``merge_adapter()``, then the first forward.
  ``overhead`` = the switch + first forward - a steady forward.

Per switch the script also observes, by comparing every gated layer's weight before and after, how many layers got a
newly formed (merged) weight and its bytes (``formed``: the bytes allocated and written), and how many layers changed
at all (``touched``: formed + set back to the base weight). The expectation for merged switches: formed = B's active
layers, touched = A's and B's active layers together, independent of N and of the size of the rest of the model;
unmerged switches form and touch nothing. On cuda it also
reports the bytes the allocator handed out during the switch (``torch.cuda.memory_stats``), minus a steady forward's.

Parts (each a table):
1. N sweep: N = 1, 10, 50 adapters loaded (``--n-adapters``), each with ``--active-frac`` (30%) of the layers active
   (each its own random set); every round switches between a random pair. N = 1 has no second adapter: it switches
   from the base model (adapters disabled with ``disable_adapter_layers``) to the adapter.
2. Active-fraction sweep: adapters with 10% and 60% active layers (``--fractions``); switches 10->10, 10->60, 60->10,
   60->60 (a fresh random set per adapter).
3. Adapter size: ``adapter_model.safetensors`` bytes for a few active fractions (``--size-fractions``) vs the full
   model saved with safetensors, and the bytes a loaded adapter holds in memory.

Examples:
    python benchmarks/bench_switch.py                          # CPU defaults, about 1-2 minutes on 2 cores
    python benchmarks/bench_switch.py --quick --json out.json  # functional check
    python benchmarks/bench_switch.py --device cuda --model vit_base_patch16_224 --img-size 224 --n-adapters 1,10,50
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import taps_peft  # noqa: E402
from torch import nn

import _common as C

BASE = "__base__"


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    C.add_common_args(p, batch=8)
    p.add_argument("--n-adapters", type=_ints, default=None, help="adapters loaded, comma-separated (default 1,10,50; "
                   "quick: 1,4)")
    p.add_argument("--active-frac", type=float, default=0.3, help="active fraction of every N-sweep adapter")
    p.add_argument("--fractions", type=_floats, default=[0.1, 0.6], help="active fractions of the sweep (default "
                   "0.1,0.6)")
    p.add_argument("--size-fractions", type=_floats, default=[0.1, 0.3, 0.6, 1.0], help="active fractions whose "
                   "saved size is reported")
    p.add_argument("--rounds", type=int, default=None, help="timed switches per mode and configuration/pair "
                   "(default: 16 on cpu, 30 on cuda; quick: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; quick 1)")
    p.add_argument("--keep", default=None, metavar="DIR", help="save the adapters here (kept) instead of a temp dir")
    args = p.parse_args(argv)
    if args.n_adapters is None:
        args.n_adapters = [1, 4] if args.quick else [1, 10, 50]
    if args.rounds is None:
        args.rounds = 3 if args.quick else (16 if args.device == "cpu" else 30)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.rounds < 1 or args.warmup < 0 or min(args.n_adapters) < 1:
        p.error("--rounds >= 1, --warmup >= 0, --n-adapters >= 1")
    for f in [args.active_frac, *args.fractions, *args.size_fractions]:
        if not 0.0 <= f <= 1.0:
            p.error("active fractions must be in [0, 1]")
    C.check_common_args(p, args)
    args.n_adapters = sorted(set(args.n_adapters))
    return args


# ----------------------------------------------------------------------------------------------------------------
# Making and loading adapters
# ----------------------------------------------------------------------------------------------------------------


class AdapterFactory:
    """One TAPS model used as a template: shape its adapter, save it, repeat (no deep copy per adapter)."""

    def __init__(self, base: nn.Module, root: str, seed: int) -> None:
        import taps_peft
        from peft import get_peft_model

        self.template = get_peft_model(copy.deepcopy(base), taps_peft.TAPSConfig())
        self.n_layers = len(C.taps_layers(self.template))
        self.root = root
        self.seed = seed
        self.active: dict[str, set[int]] = {}

    def make(self, name: str, frac: float) -> str:
        seed = self.seed * 100003 + len(self.active) + 1
        active = C.choose_active(self.n_layers, frac, random.Random(seed))
        C.shape_adapter(self.template, "default", active, seed=seed)
        path = os.path.join(self.root, name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.template.save_pretrained(path)
        self.active[name] = active
        return path

    def file_bytes(self, name: str) -> int:
        return os.path.getsize(os.path.join(self.root, name, "adapter_model.safetensors"))


def serve(base: nn.Module, factory: AdapterFactory, names: list[str], args) -> tuple[nn.Module, list[float]]:
    """A fresh copy of the base with ``names`` loaded from disk; returns the model and the load time per adapter."""
    from peft import PeftModel

    load_ms = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        model = PeftModel.from_pretrained(copy.deepcopy(base).to(args.device), os.path.join(factory.root, names[0]),
                                          adapter_name=names[0], torch_device=args.device)
        load_ms.append((time.perf_counter() - t0) * 1e3)
        for name in names[1:]:
            load_ms.extend(load_more(model, factory, [name], args))
    return model.eval(), load_ms


def load_more(model: nn.Module, factory: AdapterFactory, names: list[str], args) -> list[float]:
    load_ms = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            t0 = time.perf_counter()
            model.load_adapter(os.path.join(factory.root, name), adapter_name=name, torch_device=args.device)
            load_ms.append((time.perf_counter() - t0) * 1e3)
    model.eval()
    return load_ms


def adapter_held_bytes(model: nn.Module, name: str) -> int:
    """Bytes one loaded adapter holds in memory: its deltas and scores on every gated layer, its head/norm copies."""
    from peft.utils.other import ModulesToSaveWrapper

    tensors = []
    for _, layer in C.taps_layers(model):
        tensors += [layer.taps_delta.get(name), layer.taps_scores.get(name)]
    for m in model.modules():
        if isinstance(m, ModulesToSaveWrapper) and name in m.modules_to_save:
            tensors += list(m.modules_to_save[name].state_dict().values())
    return C.storage_bytes(tensors)


# ----------------------------------------------------------------------------------------------------------------
# Switching
# ----------------------------------------------------------------------------------------------------------------


def _is_disabled(model: nn.Module) -> bool:
    return any(m.disable_adapters for _, m in C.taps_layers(model)[:1])


def _is_merged(model: nn.Module) -> bool:
    return any(m.merged for _, m in C.taps_layers(model))


def set_task(model: nn.Module, name: str) -> None:
    """Make ``name`` the task (unmerged); ``__base__`` = adapters disabled."""
    if name == BASE:
        model.base_model.disable_adapter_layers()
        return
    if _is_disabled(model):
        model.base_model.enable_adapter_layers()
    model.set_adapter(name)


def merged_switch(model: nn.Module, name: str) -> None:
    """unmerge + set_adapter + merge (``__base__``: unmerge + disable)."""
    if _is_merged(model):
        model.unmerge_adapter()
    set_task(model, name)
    if name != BASE:
        model.merge_adapter()


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    """Per gated layer: the tensor its base weight points at (references are held, so no storage is reused while we
    compare)."""
    return [layer.get_base_layer().weight.data for _, layer in C.taps_layers(model)]


def diff(before, after, original_ptrs: list[int]) -> dict[str, int]:
    """Layers that got a newly formed (merged) weight and its bytes, and layers that changed at all."""
    formed = formed_bytes = touched = 0
    for wb, wa, orig in zip(before, after, original_ptrs):
        if wa.data_ptr() not in (wb.data_ptr(), orig):
            formed += 1
            formed_bytes += wa.nbytes
        touched += wa.data_ptr() != wb.data_ptr()
    return {"formed_layers": formed, "formed_bytes": formed_bytes, "touched_layers": touched}


def _cuda_alloc() -> int:
    return torch.cuda.memory_stats().get("allocated_bytes.all.allocated", 0)


@dataclass
class Samples:
    switch_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)
    steady_ms: list[float] = field(default_factory=list)
    overhead_ms: list[float] = field(default_factory=list)
    formed_layers: list[int] = field(default_factory=list)
    formed_bytes: list[int] = field(default_factory=list)
    touched_layers: list[int] = field(default_factory=list)
    b_active: list[int] = field(default_factory=list)
    union_active: list[int] = field(default_factory=list)
    cuda_alloc_bytes: list[int] = field(default_factory=list)

    def extend(self, other: "Samples") -> None:
        for k in vars(self):
            getattr(self, k).extend(getattr(other, k))


class Switcher:
    """Times switches A -> B on one served model, in both modes, and observes what each switch formed/touched."""

    def __init__(self, model: nn.Module, x: torch.Tensor, args, active: dict[str, set[int]]) -> None:
        self.model, self.x, self.args, self.active = model, x, args, active
        if _is_merged(model):
            model.unmerge_adapter()
        self.original = [m.get_base_layer().weight.data_ptr() for _, m in C.taps_layers(model)]
        self.layer_bytes = [m.get_base_layer().weight.nbytes for _, m in C.taps_layers(model)]
        self.max_diff = 0.0
        self.beyond_active = 0  # switches that formed/touched layers outside A's and B's active sets
        self._unmerged_out: dict[str, torch.Tensor] = {}

    def forward(self) -> torch.Tensor:
        with torch.no_grad(), C.autocast(self.args):
            return self.model(self.x)

    def _timed_forward(self) -> tuple[float, torch.Tensor]:
        with C.Timer(self.args.device) as t:
            out = self.forward()
        return t.ms, out

    def switch(self, mode: str, a: str, b: str, s: Samples, record: bool) -> None:
        cuda = self.args.device == "cuda"
        # Untimed: the model serves task A in this mode, with a forward done (allocator warm).
        if mode == "unmerged":
            if _is_merged(self.model):
                self.model.unmerge_adapter()
            set_task(self.model, a)
        else:
            merged_switch(self.model, a)
        self.forward()
        before = snapshot(self.model)
        alloc0 = _cuda_alloc() if cuda else 0
        with C.Timer(self.args.device) as t:
            if mode == "unmerged":
                set_task(self.model, b)
            else:
                merged_switch(self.model, b)
        first_ms, out = self._timed_forward()
        alloc1 = _cuda_alloc() if cuda else 0
        after = snapshot(self.model)
        d = diff(before, after, self.original)
        del before, after
        steady_ms, _ = self._timed_forward()
        alloc2 = _cuda_alloc() if cuda else 0

        # Checks: the merged switch serves what the unmerged one does; nothing outside A u B is re-formed.
        if mode == "unmerged":
            self._unmerged_out.setdefault(b, out.float())
        elif b in self._unmerged_out:
            self.max_diff = max(self.max_diff, float((out.float() - self._unmerged_out[b]).abs().max()))
        act_a, act_b = self.active.get(a, set()), self.active.get(b, set())
        if d["formed_layers"] > len(act_b) or d["touched_layers"] > len(act_a | act_b):
            self.beyond_active += 1
        if not record:
            return
        s.switch_ms.append(t.ms)
        s.first_ms.append(first_ms)
        s.steady_ms.append(steady_ms)
        s.overhead_ms.append(t.ms + first_ms - steady_ms)
        s.formed_layers.append(d["formed_layers"])
        s.formed_bytes.append(d["formed_bytes"])
        s.touched_layers.append(d["touched_layers"])
        s.b_active.append(len(act_b))
        s.union_active.append(len(act_a | act_b))
        if cuda:
            s.cuda_alloc_bytes.append((alloc1 - alloc0) - (alloc2 - alloc1))

    def finish(self) -> None:
        if _is_merged(self.model):
            self.model.unmerge_adapter()


Job = tuple[Switcher, Any, str, str]  # (switcher, result key, task A, task B)


def interleave(rounds: list[list[Job]], warmup: int) -> dict[tuple[str, Any], Samples]:
    """``rounds[r]``: the switches of round r (order rotated per round), each timed in both modes (mode order rotated
    per round), so machine noise hits every configuration and mode alike. Results keyed on (mode, job key)."""
    out: dict[tuple[str, Any], Samples] = {}
    with C.no_gc():
        for r, jobs in enumerate(rounds):
            for sw, key, a, b in C.rotate(jobs, r):
                for mode in C.rotate(["unmerged", "merged"], r):
                    sw.switch(mode, a, b, out.setdefault((mode, key), Samples()), record=r >= warmup)
    for sw in {id(j[0]): j[0] for js in rounds for j in js}.values():
        sw.finish()
    return out


def _record_checks(checks: dict, switchers: list[Switcher]) -> None:
    diffs = [checks.get("max_abs_diff_merged_vs_unmerged", 0.0)] + [sw.max_diff for sw in switchers]
    checks["max_abs_diff_merged_vs_unmerged"] = max(diffs)
    checks["switches_beyond_active_sets"] = checks.get("switches_beyond_active_sets", 0) + sum(
        sw.beyond_active for sw in switchers)


def row(label: str, mode: str, s: Samples, model_bytes: int) -> dict[str, Any]:
    med = lambda v: statistics.median(v) if v else None  # noqa: E731
    formed = med(s.formed_bytes)
    return {
        "config": label,
        "mode": mode,
        "switches": len(s.switch_ms),
        "switch_ms": med(s.switch_ms),
        "first_forward_ms": med(s.first_ms),
        "steady_forward_ms": med(s.steady_ms),
        # overhead: median(switch + 1st forward) - median(steady forward); robust to a single slow forward
        "overhead_ms": med([a + b for a, b in zip(s.switch_ms, s.first_ms)]) - med(s.steady_ms),
        "overhead_paired_median_ms": med(s.overhead_ms),
        "overhead_paired_p25_ms": C._quantile(s.overhead_ms, 0.25),
        "overhead_paired_p75_ms": C._quantile(s.overhead_ms, 0.75),
        "b_active_layers": med(s.b_active),
        "union_active_layers": med(s.union_active),
        "formed_layers": med(s.formed_layers),
        "touched_layers": med(s.touched_layers),
        "formed_bytes": formed,
        "formed_bytes_mean": statistics.fmean(s.formed_bytes) if s.formed_bytes else None,
        "formed_over_model_bytes": formed / model_bytes if formed is not None else None,
        "cuda_alloc_bytes": med(s.cuda_alloc_bytes),
        "samples": {k: v for k, v in vars(s).items()},
    }


# ----------------------------------------------------------------------------------------------------------------
# The three parts
# ----------------------------------------------------------------------------------------------------------------


def n_sweep(base, factory: AdapterFactory, x, args, model_bytes: int, checks: dict) -> list[dict[str, Any]]:
    """One served copy of the base per N (so the N values are interleaved round by round), random pairs."""
    names = [f"t{i}" for i in range(max(args.n_adapters))]
    for name in names:
        factory.make(name, args.active_frac)
    served = {}
    for n in args.n_adapters:
        model, load_ms = serve(base, factory, names[:n], args)
        served[n] = (Switcher(model, x, args, factory.active), load_ms)
    rng = random.Random(args.seed + 7)
    rounds = []
    for _ in range(args.warmup + args.rounds):
        jobs = []
        for n in args.n_adapters:
            if n == 1:  # always base -> t0 (t0 -> base forms nothing; pooling both would blur the medians)
                a, b = BASE, names[0]
            else:
                a, b = rng.sample(names[:n], 2)
            jobs.append((served[n][0], n, a, b))
        rounds.append(jobs)
    res = interleave(rounds, args.warmup)
    rows = []
    for n in args.n_adapters:
        sw, load_ms = served[n]
        held = C.storage_bytes(C.held_tensors(sw.model))
        for mode in ["unmerged", "merged"]:
            r = row(f"N={n}" + (" (base->t0)" if n == 1 else ""), mode, res[(mode, n)], model_bytes)
            r.update({"n_adapters": n, "held_bytes": held, "load_ms_median": statistics.median(load_ms)})
            rows.append(r)
    _record_checks(checks, [sw for sw, _ in served.values()])
    checks["adapter_held_bytes"] = adapter_held_bytes(served[args.n_adapters[0]][0].model, names[0])
    return rows


def fraction_sweep(base, factory: AdapterFactory, x, args, model_bytes: int, checks: dict) -> list[dict[str, Any]]:
    """Two adapters per fraction on one served model; every (fraction A -> fraction B) kind in every round."""
    args.fractions = list(dict.fromkeys(args.fractions))
    tag_of = {f: f"f{i}_{round(f * 100)}pct" for i, f in enumerate(args.fractions)}  # unique adapter names
    frac_of: dict[str, float] = {}
    for f in args.fractions:
        for tag in "ab":
            factory.make(tag_of[f] + tag, f)
            frac_of[tag_of[f] + tag] = f
    model, _ = serve(base, factory, list(frac_of), args)
    sw = Switcher(model, x, args, factory.active)
    kinds = list(itertools.product(args.fractions, repeat=2))  # (fraction of A, fraction of B), A -> B
    pairs = [(tag_of[fa] + "a", tag_of[fb] + "b") for fa, fb in kinds]
    rounds = []
    for r in range(args.warmup + args.rounds):
        # Both directions of every pair, alternating per round; a -> b is kind (fa, fb), b -> a is kind (fb, fa).
        jobs = [(a, b) if r % 2 == 0 else (b, a) for a, b in pairs]
        rounds.append([(sw, (frac_of[a], frac_of[b]), a, b) for a, b in jobs])
    res = interleave(rounds, args.warmup)
    rows = []
    for fa, fb in kinds:
        for mode in ["unmerged", "merged"]:
            r = row(f"{fa:.0%} -> {fb:.0%}", mode, res[(mode, (fa, fb))], model_bytes)
            r.update({"frac_a": fa, "frac_b": fb})
            rows.append(r)
    _record_checks(checks, [sw])
    return rows


def sizes(factory: AdapterFactory, args, full_file: int, model_bytes: int) -> list[dict[str, Any]]:
    rows = []
    for f in args.size_fractions:
        name = f"size{len(rows)}_{round(f * 100)}pct"
        factory.make(name, f)
        summary = taps_peft.taps_summary(factory.template, "default")
        file_bytes = factory.file_bytes(name)
        rows.append(
            {
                "active_frac": f,
                "active_layers": f"{summary['active_layers']}/{summary['total_layers']}",
                "file_bytes": file_bytes,
                "summary_adapter_bytes": summary["adapter_bytes"],
                "file_over_full_model_file": file_bytes / full_file,
                "file_over_model_bytes": file_bytes / model_bytes,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def print_switch_table(title: str, rows: list[dict[str, Any]], cuda: bool, extra: Optional[str] = None) -> None:
    print(f"\n{title}")
    head = (f"{'tasks':<16} {'mode':<9} {'n':>3} {'switch ms':>9} {'1st fwd ms':>10} {'fwd ms':>7} "
            f"{'overhead ms (p25  p75)':>23} {'|B|':>4} {'|AuB|':>5} {'formed':>6} {'touched':>7} {'formed MiB':>10} "
            f"{'/model':>7}" + (f" {'cuda alloc MiB':>14}" if cuda else "") + (f" {extra:>9}" if extra else ""))
    print(head)
    print("-" * len(head))
    for r in rows:
        line = (
            f"{r['config']:<16} {r['mode']:<9} {r['switches']:>3} {r['switch_ms']:>9.2f} {r['first_forward_ms']:>10.2f} "
            f"{r['steady_forward_ms']:>7.2f} {r['overhead_ms']:>8.2f} ({r['overhead_paired_p25_ms']:>6.1f} "
            f"{r['overhead_paired_p75_ms']:>6.1f}) {r['b_active_layers']:>4.0f} {r['union_active_layers']:>5.0f} "
            f"{r['formed_layers']:>6.0f} {r['touched_layers']:>7.0f} {C.mib(r['formed_bytes']):>10} "
            f"{r['formed_over_model_bytes']:>7.3f}"
        )
        if cuda:
            line += f" {C.mib(r['cuda_alloc_bytes']):>14}"
        if extra == "held MiB":
            line += f" {C.mib(r['held_bytes']):>9}"
        print(line)


def print_report(res: dict[str, Any]) -> None:
    cfg, env = res["config"], res["env"]
    cuda = cfg["device"] == "cuda"
    print(
        f"\n{cfg['model']} img {cfg['img_size']} batch {cfg['batch']} | {cfg['device']} {cfg['dtype']} | eval, no_grad | "
        f"{cfg['rounds']} timed rounds after {cfg['warmup']} warm-up, modes interleaved | torch {env['torch']} "
        f"threads {env['torch_threads']} | load {env['loadavg_1m']}"
    )
    print(
        f"{res['gated_layers']} gated layers, gated weights {C.mib(res['gated_weight_bytes'])} MiB, model "
        f"{C.mib(res['model_bytes'])} MiB; switch = set_adapter (unmerged) or unmerge+set_adapter+merge (merged); "
        "overhead = median(switch + 1st forward) - median(steady forward) (p25, p75 of the per-switch difference); formed = layers given a new W_base + dW; touched = "
        "layers changed at all"
    )
    print_switch_table(f"1. N adapters loaded, each {cfg['active_frac']:.0%} active (random pairs)", res["n_sweep"],
                       cuda, extra="held MiB")
    print("   adapter load median ms (from_pretrained, load_adapter): " + ", ".join(
        f"N={r['n_adapters']}: {r['load_ms_median']:.0f}" for r in res["n_sweep"] if r["mode"] == "merged"))
    print_switch_table("2. Active fractions of the two tasks (both directions)", res["fraction_sweep"], cuda)
    print(f"\n3. Adapter size on disk (adapter_model.safetensors) vs the full model ({C.mib(res['full_model_file_bytes'])}"
          f" MiB as safetensors)")
    head = f"{'active':>7} {'layers':>7} {'file MiB':>9} {'/ full model':>12} {'taps_summary MiB':>17}"
    print(head)
    print("-" * len(head))
    for r in res["sizes"]:
        print(f"{r['active_frac']:>7.0%} {r['active_layers']:>7} {C.mib(r['file_bytes']):>9} "
              f"{r['file_over_full_model_file']:>12.3f} {C.mib(r['summary_adapter_bytes']):>17}")
    ch = res["checks"]
    print(
        f"\nIn memory a loaded adapter holds {C.mib(ch['adapter_held_bytes'])} MiB (storage of its deltas, scores, "
        f"head and norms; closed layers hold no delta) = {ch['adapter_held_bytes'] / res['model_bytes']:.2f} x "
        "the model."
    )
    print(
        f"checks: |merged - unmerged| output max {ch['max_abs_diff_merged_vs_unmerged']:.2e}; switches that formed or "
        f"touched layers outside A's and B's active sets: {ch['switches_beyond_active_sets']}"
    )
    for k, v in res["headline"].items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")


def headline(res: dict[str, Any]) -> dict[str, Any]:
    """A few numbers for run_all's summary table."""
    out: dict[str, Any] = {}
    for r in res["n_sweep"]:
        out[f"overhead_ms {r['mode']} N={r['n_adapters']}"] = r["overhead_ms"]
    for r in res["n_sweep"]:
        out[f"formed_MiB {r['mode']} N={r['n_adapters']}"] = r["formed_bytes"] / 2**20
    for r in res["fraction_sweep"]:
        if r["mode"] == "merged":
            out[f"formed_MiB merged {r['config']}"] = r["formed_bytes"] / 2**20
    for r in res["sizes"]:
        out[f"adapter_file/full_model at {r['active_frac']:.0%}"] = r["file_over_full_model_file"]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    from safetensors.torch import save_file

    args = parse_args(argv)
    t_start = time.perf_counter()
    base = C.build_base(args).eval()
    x, _ = C.make_batch(args)
    model_bytes = C.state_dict_bytes(base)
    with tempfile.TemporaryDirectory(prefix="taps_switch_") as tmp:
        root = args.keep or tmp
        os.makedirs(root, exist_ok=True)
        full_path = os.path.join(root, "full_model.safetensors")
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, full_path)
        full_file = os.path.getsize(full_path)
        factory = AdapterFactory(base, root, args.seed)
        layers = C.taps_layers(factory.template)
        gated_bytes = sum(m.get_base_layer().weight.nbytes for _, m in layers)
        checks: dict[str, Any] = {}
        res: dict[str, Any] = {
            "benchmark": "switch",
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "env": C.env_info(args),
            "gated_layers": len(layers),
            "gated_weight_bytes": gated_bytes,
            "model_bytes": model_bytes,
            "full_model_file_bytes": full_file,
        }
        phases = {}
        t0 = time.perf_counter()
        res["n_sweep"] = n_sweep(base, factory, x, args, model_bytes, checks)
        phases["n_sweep_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        res["fraction_sweep"] = fraction_sweep(base, factory, x, args, model_bytes, checks)
        phases["fraction_sweep_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        res["sizes"] = sizes(factory, args, full_file, model_bytes)
        phases["sizes_s"] = time.perf_counter() - t0
        res["phases"] = phases
    res["checks"] = checks
    res["headline"] = headline(res)
    res["wall_s"] = time.perf_counter() - t_start
    C.emit(res, args, print_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
