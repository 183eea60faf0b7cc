"""Hub round trip through unmodified huggingface_hub calls, against the loopback server in tests/hub_server.py.

``huggingface_hub`` reads ``HF_ENDPOINT``/``HF_HUB_OFFLINE`` when it is imported, and conftest.py has already imported
it (via taps_peft) before any fixture runs, so the push/pull runs in one child process started with the environment
set (this file's ``__main__`` part). That child also refuses any non-loopback connection. The parent holds the server
and checks the repo it received, the child's logs and the Authorization headers.
"""

from __future__ import annotations

import json
import taps_peft  # noqa: E402
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import HANG, optimizer_for



HERE = Path(__file__).resolve().parent
TOKEN = "hf_TapsTestToken_3f9c2a7e41d8"  # dummy; must never show up in a card, a repo file or a log
KINDS = ("timm_vit", "hf_vit")


# ----- the child process: push, then pull into a fresh base -----


def _block_non_loopback() -> list[str]:
    """Make every non-loopback TCP connect fail (and record it): nothing may reach huggingface.co."""
    blocked: list[str] = []
    connect = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            blocked.append(str(address[0]))
            raise OSError(f"test guard: no network beyond loopback ({address[0]})")
        return connect(sock, address)

    socket.socket.connect = guarded  # type: ignore[method-assign]
    return blocked


def _client(out: Path) -> None:
    blocked = _block_non_loopback()
    import torch
    import torch.nn.functional as F
    from peft import PeftModel, get_peft_model

    import taps_peft
    from conftest import MODELS, logits

    results: dict[str, Any] = {}
    for kind in KINDS:
        torch.manual_seed(0)
        model = get_peft_model(MODELS[kind](), taps_peft.TAPSConfig(lam=0.5))
        optimizer = optimizer_for(model, torch.optim.AdamW, lr=1e-2, score_lr=1e-2)
        x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
        for step in range(3):  # a few real steps: deltas, norms and head move away from the base
            loss = F.cross_entropy(logits(model, x), y) + model.taps_penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():  # close every other gate (scores are the only "score" parameters)
            scores = [p for n, p in model.named_parameters() if "score" in n]
            for p in scores[1::2]:
                p.fill_(0.0)
        model.eval()
        expected = logits(model, x[:4]).detach()
        repo = f"user/taps-{kind}"
        taps_peft.push_to_hub(model, repo)
        taps_peft.save_adapter(model, str(out / kind))  # the local save gets the card too
        model.push_to_hub(f"{repo}-peft")  # PEFT's own push (transformers' card): loads the same

        loaded, got = {}, {}
        for source in (repo, f"{repo}-peft", str(out / kind)):  # from the Hub, and from the local folder
            torch.manual_seed(0)
            loaded[source] = PeftModel.from_pretrained(MODELS[kind](), source).eval()
            got[source] = logits(loaded[source], x[:4]).detach()
        results[kind] = {
            "repo": repo,
            "same_as_local_load": bool(torch.equal(got[repo], got[str(out / kind)])
                                       and torch.equal(got[f"{repo}-peft"], got[str(out / kind)])),
            "max_abs_diff": float((expected - got[repo]).abs().max()),
            "summary": taps_peft.taps_summary(model),
            "loaded_summary": taps_peft.taps_summary(loaded[repo]),
            "report": taps_peft.taps_layer_report(model),
        }
    results["vanishing"] = _load_from_a_changing_server(out)
    results["blocked"] = blocked
    (out / "results.json").write_text(json.dumps(results))


def _load_from_a_changing_server(out: Path) -> dict[str, Any]:
    """``user/vanishing`` lists adapter_model.safetensors but answers 404 when it is downloaded, and also holds an
    adapter_model.bin: PEFT alone would fall back to the pickle. The load must fail clearly, never ask for the pickle,
    and leave the base as it was."""
    import torch
    from huggingface_hub import HfApi
    from peft import PeftModel
    from safetensors.torch import load_file

    from conftest import MODELS

    folder = out / "vanishing"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((out / "timm_vit" / name).read_bytes())
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    HfApi().create_repo("user/vanishing", exist_ok=True)
    HfApi().upload_folder(repo_id="user/vanishing", folder_path=str(folder))
    base = MODELS["timm_vit"]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    try:
        PeftModel.from_pretrained(base, "user/vanishing")
        error = None
    except Exception as err:  # noqa: BLE001 (the test checks which)
        error = f"{type(err).__name__}: {err}"
    after = base.state_dict()
    return {"error": error, "unchanged": before.keys() == after.keys() and all(
        torch.equal(v, after[k]) for k, v in before.items())}


# ----- the tests (parent process) -----


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory: pytest.TempPathFactory):
    """Start the server, run the child once for both models; yield (server, results, child logs, out dir)."""
    from hub_server import HubServer

    out = tmp_path_factory.mktemp("hub")
    with HubServer(token=TOKEN) as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": TOKEN,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(out / "hf_home"),  # empty cache: the pull really downloads
            "HF_HUB_VERBOSITY": "debug",  # as much logging as the client does,
            "HF_DEBUG": "1",  # including every request as a curl command
            "TRANSFORMERS_VERBOSITY": "info",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        hub.vanishing.add(("user/vanishing", "adapter_model.safetensors"))
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), str(out)], env=env, capture_output=True, text=True,
            timeout=HANG,
        )
        logs = proc.stdout + proc.stderr
        assert proc.returncode == 0, logs[-4000:]
        yield hub, json.loads((out / "results.json").read_text()), logs, out


@pytest.mark.parametrize("kind", KINDS)
def test_push_then_from_pretrained_gives_identical_logits(round_trip, kind):
    hub, results, _, out = round_trip
    r = results[kind]
    assert r["same_as_local_load"]  # the Hub round trip is bit-exact with a local save/load ...
    assert r["max_abs_diff"] == 0.0  # ... which restores the trained model exactly
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert hub.files(r["repo"])[name] == (out / kind / name).read_bytes()
    assert 0 < r["summary"]["active_layers"] < r["summary"]["total_layers"]  # some gates closed, some open
    assert r["loaded_summary"]["active_layers"] == r["summary"]["active_layers"]
    assert set(hub.files(r["repo"])) == {".gitattributes", "README.md", "adapter_config.json",
                                         "adapter_model.safetensors"}
    assert results["blocked"] == []  # nothing tried to leave the loopback


@pytest.mark.parametrize("kind", KINDS)
def test_pushed_card_describes_the_adapter(round_trip, kind):
    hub, results, _, out = round_trip
    r, s = results[kind], results[kind]["summary"]
    card = hub.files(r["repo"])["README.md"].decode()
    assert card.startswith("---\n") and "library_name: peft" in card and "- taps" in card
    assert f"| Active layers (k/L) | {s['active_layers']}/{s['total_layers']} " in card
    assert "| lam (sparsity weight) | 0.5 |" in card and "| tau (gate threshold) | 0.1 |" in card
    assert "Adapter size |" in card and "import taps_peft" in card
    assert f'PeftModel.from_pretrained(base, "{r["repo"]}")' in card
    for row in r["report"]:  # the layer map: every gated layer, with its score and gate
        assert f"| `{row['name']}` | {row['score']:.4f} | {'yes' if row['active'] else 'no'} |" in card
    if kind == "timm_vit":  # a random-init ViT with img 32, patch 8, depth 2: no pretrained tag, no guessed snippet
        assert "| Base model | `vit_tiny_patch16_224` (timm)" in card and "| Classes | 5 |" in card
        assert "base_model:" not in card and "pretrained=True" not in card
        assert "built with arguments this adapter does not record" in card
    else:
        assert "| Base model | `ViTForImageClassification` (transformers, model_type `vit`)" in card
        assert "base_model:" not in card  # built from a config: no Hub id to name
    local = (out / kind / "README.md").read_text()
    assert "import taps_peft" in local and f"{s['active_layers']}/{s['total_layers']}" in local


def test_token_sent_but_never_written_or_logged(round_trip):
    hub, _, logs, out = round_trip
    assert hub.auth_headers and set(hub.auth_headers) == {f"Bearer {TOKEN}"}  # writes were authenticated
    for (_, repo_id), repo in hub.repos.items():
        for path, data in repo.files.items():
            assert TOKEN.encode() not in data, f"token in {repo_id}/{path}"
    for path in out.rglob("*"):
        if path.is_file() and "hf_home" not in path.parts:  # the saved folders (the cache holds the repo files)
            assert TOKEN.encode() not in path.read_bytes(), path
    assert "(authenticated: True)" in logs and "Send: curl" in logs  # debug logging really ran ...
    assert TOKEN not in logs  # ... and never printed the token


def test_a_server_that_stops_serving_the_safetensors_never_gets_a_pickle_loaded(round_trip):
    hub, results, _, _ = round_trip
    r = results["vanishing"]
    assert r["error"] is not None and "answered 404" in r["error"] and "never falls back" in r["error"], r
    assert r["unchanged"]  # the base model is as it was: no TAPS layer left in it
    assert not any("adapter_model.bin" in request for request in hub.requests)


# ----- the card on its own (no server) -----


@pytest.mark.parametrize("front_matter", ["---\nlicense: mit\ntags:\n- mine\n---\n", ""])
def test_card_refresh_keeps_user_text_and_metadata(tmp_path, front_matter):
    import torch
    from peft import get_peft_model

    import taps_peft
    from taps_peft.hub.card import BEGIN, END, save_model_card
    from conftest import tiny_timm_vit

    model = get_peft_model(tiny_timm_vit(), taps_peft.TAPSConfig(lam=0.5))
    (tmp_path / "README.md").write_text(front_matter + "# My task\n\nNotes by me.\n")
    save_model_card(model, tmp_path)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "score" in n).fill_(0.0)
    text = save_model_card(model, tmp_path, repo_id="me/task").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1  # refreshed, not appended twice
    assert text.startswith("---\n") and text.count("---\n") == 2 and "library_name: peft" in text and "- taps" in text
    assert "# My task\n\nNotes by me." in text and ("license: mit" in text and "- mine" in text) == bool(front_matter)
    s = taps_peft.taps_summary(model)
    assert f"{s['active_layers']}/{s['total_layers']}" in text and s["active_layers"] == s["total_layers"] - 1
    assert 'PeftModel.from_pretrained(base, "me/task")' in text



def test_save_pretrained_writes_the_taps_card_and_keeps_the_user_s_readme(tmp_path):
    """``model.save_pretrained`` (PEFT's own, unpatched) writes the TAPS card: through ``TAPSConfig.save_pretrained``,
    which PEFT calls after the weights. A README of the user's keeps its text and metadata around the TAPS section, a
    second save refreshes the section, a second adapter gets its card in its folder, and a state dict taken without
    saving leaves the config copyable and picklable."""
    import copy
    import pickle

    import torch
    from peft import get_peft_model, get_peft_model_state_dict

    import taps_peft
    from taps_peft.hub.card import BEGIN, END
    from conftest import tiny_timm_vit

    model = get_peft_model(tiny_timm_vit(), taps_peft.TAPSConfig(lam=0.5))
    model.add_adapter("b", taps_peft.TAPSConfig(lam=0.2))
    with torch.no_grad():
        model.base_model.taps_layers()[0][1].taps_scores["default"].fill_(0.0)
    fresh, mine = tmp_path / "fresh", tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("---\nlicense: mit\n---\n# My task\n\nNotes by me.\n")
    model.save_pretrained(fresh)
    model.save_pretrained(mine)
    model.save_pretrained(mine)
    layer = model.base_model.taps_layers()[0][0]
    for folder in (fresh, mine):
        text = (folder / "README.md").read_text()
        assert text.count(BEGIN) == 1 and text.count(END) == 1 and "[More Information Needed]" not in text
        assert "# TAPS adapter for `vit_tiny_patch16_224`" in text and "| Active layers (k/L) | 7/8 (87.5%) |" in text
        assert f"| `{layer}` | 0.0000 | no |" in text and "import taps_peft  # registers TAPS with PEFT" in text
        assert "library_name: peft" in text
    text = (mine / "README.md").read_text()
    assert text.count("# My task\n\nNotes by me.") == 1 and "license: mit" in text
    card_b = (fresh / "b" / "README.md").read_text()
    assert "| Adapter | `b` |" in card_b and "| lam (sparsity weight) | 0.2 |" in card_b and 'subfolder="b"' in card_b
    get_peft_model_state_dict(model)  # the tuner's save hook runs, no save of the config follows
    config = model.peft_config["default"]
    assert pickle.loads(pickle.dumps(config)) == config and copy.deepcopy(config) == config

if __name__ == "__main__":
    _client(Path(sys.argv[1]))
