import json
import os
import socket
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError, HTTPError
from hub_server import LocalHub
from subprocess_helpers import last_json_line, run_without_glade

import glade.training.hub as hub_module
from glade.cli import main as glade_main
from glade.training.hub import push_folder
from glade.training.model_card import write_model_card

LAST_EVAL = {"step": 40, "val_loss": 5.25, "val_ppl": 190.5662, "val_bpb": 7.5742}
METRICS = [{"step": 20, "train_loss": 5.5, "lr": 1e-3, "tokens_seen": 2560, "tokens_per_sec": 900.0},
           {"step": 20, "val_loss": 5.4, "val_ppl": 221.406, "val_bpb": 7.79},
           {"step": 40, "train_loss": 5.3, "lr": 5e-4, "tokens_seen": 5120, "tokens_per_sec": 910.0},
           LAST_EVAL]
REMOTE_CODE = ["configuration_glade.py", "modeling_glade.py", "kernels_glade.py"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    # The suite runs offline; this Hub is a local process on 127.0.0.1, so in-process clients may talk to it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # With hf_xet installed, upload_folder's pipeline retries a failed commit itself (1 s, 2 s, ... up to 5 times);
    # the plain single-commit path lets the failures the server injects reach push_folder's own retry loop.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    with LocalHub(tmp_path / "hub") as server:
        yield server


@pytest.fixture
def model_dir(tmp_path, model, tokenizer):
    directory = tmp_path / "glade-push"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS))
    write_model_card(directory, repo_id="org/glade-push", dataset_names=["roneneldan/TinyStories"])
    return directory


@pytest.fixture
def sleeps(monkeypatch):
    delays = []
    monkeypatch.setattr(hub_module, "sleep", delays.append)
    return delays


def hub_env(hub: LocalHub, tmp_path, token: str) -> dict[str, str]:
    """huggingface_hub reads these at import: point a fresh interpreter (and a fresh cache) at the local Hub."""
    return {
        "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf_home_subprocess"),
        "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def test_glade_push_publishes_a_model_that_loads_without_glade(hub, model_dir, model, tokenizer, tmp_path):
    env = hub_env(hub, tmp_path, hub.token)
    pushed = subprocess.run(
        [sys.executable, "-m", "glade.cli", "push", str(model_dir), "org/glade-push", "--private"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    head = hub.repos["org/glade-push"].branches["main"]
    assert pushed.stdout.strip().splitlines()[-1] == f"{hub.url}/org/glade-push/commit/{head}"
    assert hub.repos["org/glade-push"].private

    files = hub.files("org/glade-push")
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "README.md", "metrics.jsonl", *REMOTE_CODE}
    assert set(files) == expected
    assert all(files[name] == (model_dir / name).read_bytes() for name in expected)
    config = json.loads(files["config.json"])
    assert config["auto_map"] == {
        "AutoConfig": "configuration_glade.GladeConfig",
        "AutoModel": "modeling_glade.GladeModel",
        "AutoModelForCausalLM": "modeling_glade.GladeForCausalLM",
    }
    card = ModelCard(files["README.md"].decode())
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-generation")
    assert "custom_code" in card.data.tags
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        "loss": LAST_EVAL["val_loss"], "perplexity": LAST_EVAL["val_ppl"], "bits_per_byte": LAST_EVAL["val_bpb"],
    }

    text = "Hello, Glade!"
    stdout = run_without_glade(
        f"""
        import json, torch
        try:
            import glade
            raise SystemExit("glade should not be importable here")
        except ImportError:
            pass
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained("org/glade-push", trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained("org/glade-push", trust_remote_code=True)
        ids = tokenizer({text!r}, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits
        print(json.dumps({{"module": type(model).__module__, "ids": ids.tolist(), "logits": logits.tolist()}}))
        """,
        cwd=str(tmp_path), env=env,
    )
    loaded = last_json_line(stdout)
    assert loaded["module"].startswith("transformers_modules.") and loaded["module"].endswith("modeling_glade")
    assert loaded["ids"] == [tokenizer(text).input_ids]
    with torch.no_grad():
        expected_logits = model(torch.tensor(loaded["ids"])).logits
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected_logits, rtol=0, atol=1e-5)


def test_transient_errors_are_retried_with_exponential_backoff(hub, model_dir, sleeps):
    hub.fail_commits = 2
    url = push_folder(model_dir, "org/retried", token=hub.token, endpoint=hub.url, retries=3, backoff_seconds=0.5)
    head = hub.repos["org/retried"].branches["main"]
    assert url == f"{hub.url}/org/retried/commit/{head}"
    assert hub.count("POST", r"/api/models/org/retried/commit/main") == 3
    assert sleeps == [0.5, 1.0]
    assert hub.files("org/retried")["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()


def test_retries_give_up_with_the_last_error(hub, model_dir, sleeps):
    hub.fail_commits = 10
    with pytest.raises(HfHubHTTPError) as raised:
        push_folder(model_dir, "org/down", token=hub.token, endpoint=hub.url, retries=2, backoff_seconds=1.0)
    assert raised.value.response.status_code == 503
    assert hub.count("POST", r"/api/models/org/down/commit/main") == 3
    assert sleeps == [1.0, 2.0]


def test_connection_errors_are_retried(model_dir, sleeps, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(HTTPError):
        push_folder(model_dir, "org/x", token="t", endpoint=f"http://127.0.0.1:{port}", retries=1, backoff_seconds=3)
    assert sleeps == [3]


@pytest.mark.parametrize(
    "token, revision, status, calls",
    [
        ("wrong-token", None, 401, r"/api/repos/create"),  # bad credentials
        (None, "no-such-branch", 404, r"/api/models/org/glade-push/preupload/no-such-branch"),  # unknown revision
    ],
)
def test_client_errors_are_not_retried(hub, model_dir, sleeps, token, revision, status, calls):
    with pytest.raises(HfHubHTTPError) as raised:
        push_folder(model_dir, "org/glade-push", token=token or hub.token, revision=revision, endpoint=hub.url)
    assert raised.value.response.status_code == status
    assert hub.count("POST", calls) == 1
    assert sleeps == []


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "modeling_glade.py", "README.md"])
def test_incomplete_folder_is_refused_before_any_request(hub, model_dir, missing):
    (model_dir / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"glade-push (has no|is missing) {missing}"):
        push_folder(model_dir, "org/glade-push", token=hub.token, endpoint=hub.url)
    assert hub.requests == []


def test_sharded_weights_must_all_be_present(hub, model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors",
                                            "transformer.ln_f.weight": "model-00002-of-00002.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"is missing model-00002-of-00002.safetensors$"):
        push_folder(model_dir, "org/glade-push", token=hub.token, endpoint=hub.url)


def test_only_the_main_process_pushes(hub, model_dir, monkeypatch):
    class OtherRank:
        is_main_process = False

    monkeypatch.setattr(hub_module, "PartialState", OtherRank)
    assert push_folder(model_dir, "org/glade-push", token=hub.token, endpoint=hub.url) is None
    assert hub.requests == []


def test_cli_reports_bad_arguments_cleanly(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        glade_main(["push", str(model_dir), "not a repo id!"])
    assert exited.value.code == 2
    assert "glade push: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        glade_main(["push", str(tmp_path / "absent"), "org/name"])
    assert "absent is not a directory" in capsys.readouterr().err
