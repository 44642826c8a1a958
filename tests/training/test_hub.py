import json
import logging
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import huggingface_hub.constants
import huggingface_hub.utils._http
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from hub_server import LocalHub, refusing_url, silent_server
from subprocess_helpers import last_json_line, run_without_glade

import glade.training.hub as hub_module
from glade import REMOTE_CODE_FILES
from glade.cli import main as glade_main
from glade.training.hub import HubPushError, check_model_folder, push_folder
from glade.training.model_card import write_model_card

LAST_EVAL = {"step": 40, "val_loss": 5.25, "val_ppl": 190.5662, "val_bpb": 7.5742}
METRICS = [{"step": 20, "train_loss": 5.5, "lr": 1e-3, "tokens_seen": 2560, "tokens_per_sec": 900.0},
           {"step": 20, "val_loss": 5.4, "val_ppl": 221.406, "val_bpb": 7.79},
           {"step": 40, "train_loss": 5.3, "lr": 5e-4, "tokens_seen": 5120, "tokens_per_sec": 910.0},
           LAST_EVAL]
REMOTE_CODE = list(REMOTE_CODE_FILES)


@pytest.fixture
def online(monkeypatch):
    # The suite runs offline; the servers these tests talk to are local, on 127.0.0.1.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(tmp_path, online):
    with LocalHub(tmp_path / "hub") as server:
        yield server


@pytest.fixture
def library_waits(monkeypatch):
    """The waits of huggingface_hub's own retries (1 s, 2 s, 4 s, 8 s, 8 s), recorded instead of slept."""
    waits = []
    monkeypatch.setattr(huggingface_hub.utils._http, "time", SimpleNamespace(sleep=waits.append))
    return waits


@pytest.fixture
def model_dir(tmp_path, model, tokenizer):
    directory = tmp_path / "glade-push"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS))
    write_model_card(directory, repo_id="org/glade-push", dataset_names=["roneneldan/TinyStories"])
    return directory


def push_from_the_command_line(monkeypatch, endpoint: str, *argv: str) -> int:
    """Run `glade push ARGV...` in this process against `endpoint`; returns its exit code."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)  # what HF_ENDPOINT sets at import
    with pytest.raises(SystemExit) as exited:
        glade_main(["push", *argv])
    return exited.value.code


def hub_env(hub: LocalHub, tmp_path, token: str) -> dict[str, str]:
    """huggingface_hub reads these at import: point a fresh interpreter (and a fresh cache) at the local Hub."""
    return {
        "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf_home_subprocess"),
        "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
    }


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_transient_failure_is_retried_by_huggingface_hub_alone(hub, model_dir, library_waits):
    hub.fail_commits = 2
    url = push_folder(model_dir, "org/retried", token=hub.token, endpoint=hub.url)
    head = hub.repos["org/retried"].branches["main"]
    assert url == f"{hub.url}/org/retried/commit/{head}"
    assert hub.count("POST", r"/api/models/org/retried/commit/main") == 3
    assert library_waits == [1, 2]
    assert hub.files("org/retried")["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_hub_answering_503_is_tried_a_bounded_number_of_times_then_one_line_error(
    hub, model_dir, library_waits, monkeypatch, capsys
):
    hub.fail_commits = 100
    code = push_from_the_command_line(monkeypatch, hub.url, str(model_dir), "org/down", "--token", hub.token)
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert error.splitlines()[-1] == (
        f"glade push: error: cannot push to org/down: {hub.url} answered 503 to POST /api/models/org/down/commit/main: "
        "Service Unavailable"
    )
    # huggingface_hub retries a commit at most 5 times and Glade adds no layer on top (it did: 4 x 6 attempts, 112 s).
    assert hub.count("POST", r"/api/models/org/down/commit/main") == 6
    assert sum(library_waits) == 23


@pytest.mark.slow
def test_a_server_that_never_answers_fails_within_the_timeout(model_dir, online, monkeypatch, capsys):
    with silent_server() as url:
        started = time.monotonic()
        code = push_from_the_command_line(monkeypatch, url, str(model_dir), "org/x", "--token", "t", "--timeout", "1")
        elapsed = time.monotonic() - started
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert error.splitlines()[-1] == (
        f"glade push: error: cannot push to org/x: no answer from {url} (ReadTimeout: timed out)"
    )
    assert elapsed < 20


def test_a_refused_connection_is_a_one_line_error(model_dir, online, monkeypatch, capsys):
    url = refusing_url()
    code = push_from_the_command_line(monkeypatch, url, str(model_dir), "org/x", "--token", "t")
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert error.splitlines()[-1] == (
        f"glade push: error: cannot push to org/x: no answer from {url} (ConnectError: [Errno 111] Connection refused)"
    )


def test_the_timeout_must_be_a_positive_number(model_dir):
    for timeout in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            push_folder(model_dir, "org/x", timeout=timeout)


@pytest.mark.parametrize(
    "token, revision, status, calls, reason",
    [
        ("wrong-token", None, 401, r"/api/repos/create", "Invalid credentials in Authorization header"),
        (None, "no-such-branch", 404, r"/api/models/org/glade-push/preupload/no-such-branch",
         "Revision no-such-branch not found in org/glade-push"),
    ],
)
def test_client_errors_are_not_retried(hub, model_dir, library_waits, token, revision, status, calls, reason):
    with pytest.raises(HubPushError) as raised:
        push_folder(model_dir, "org/glade-push", token=token or hub.token, revision=revision, endpoint=hub.url)
    assert isinstance(raised.value.__cause__, HfHubHTTPError)
    assert raised.value.__cause__.response.status_code == status
    assert str(raised.value) == f"cannot push to org/glade-push: {hub.url} answered {status} to POST {calls}: {reason}"
    assert hub.count("POST", calls) == 1
    assert library_waits == []


def test_a_folder_without_a_card_is_pushed_with_one_written_from_its_config_and_metrics(hub, model_dir, caplog):
    (model_dir / "README.md").unlink()
    before = {path.name: path.read_bytes() for path in model_dir.iterdir()}
    with caplog.at_level(logging.WARNING, logger=hub_module.__name__):
        push_folder(model_dir, "org/no-card", token=hub.token, endpoint=hub.url)
    assert {path.name: path.read_bytes() for path in model_dir.iterdir()} == before  # the user's folder is untouched
    assert f"{model_dir} has no README.md: pushing a card written from its config and metrics" in caplog.text

    files = hub.files("org/no-card")
    assert set(files) == {*before, "README.md"}
    assert all(files[name] == content for name, content in before.items())
    card = ModelCard(files["README.md"].decode())
    assert (card.data.library_name, card.data.model_name) == ("transformers", "no-card")
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["loss"] == LAST_EVAL["val_loss"]
    assert 'AutoModelForCausalLM.from_pretrained("org/no-card")' in card.text


def test_a_card_naming_another_repo_is_pushed_with_a_warning(hub, model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger=hub_module.__name__):
        push_folder(model_dir, "org/renamed", token=hub.token, endpoint=hub.url)
    assert hub.files("org/renamed")["README.md"] == (model_dir / "README.md").read_bytes()
    assert "does not mention org/renamed: its usage snippets load another id" in caplog.text


# kernels_glade.py is imported by modeling_glade.py, hardware.py only through fast_generate.py then decoding.py.
@pytest.mark.parametrize(
    "missing", ["config.json", "model.safetensors", "modeling_glade.py", "kernels_glade.py", "hardware.py"]
)
def test_incomplete_folder_is_refused_before_any_request(hub, model_dir, missing):
    (model_dir / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"glade-push (has no|is missing) {missing}"):
        push_folder(model_dir, "org/glade-push", token=hub.token, endpoint=hub.url)
    assert hub.requests == []


def test_every_missing_remote_code_file_is_named_in_one_line(hub, model_dir, capsys, monkeypatch):
    (model_dir / "kernels_glade.py").unlink()
    (model_dir / "sampling.py").unlink()
    code = push_from_the_command_line(monkeypatch, hub.url, str(model_dir), "org/glade-push", "--token", hub.token)
    assert code == 2
    assert capsys.readouterr().err == f"glade push: error: {model_dir} is missing kernels_glade.py, sampling.py\n"
    assert hub.requests == []


def test_the_remote_code_required_is_what_the_folders_own_code_imports(hub, model_dir):
    # A folder saved by another glade version: its modeling code imports a module this glade does not ship...
    with (model_dir / "modeling_glade.py").open("a", encoding="utf-8") as modeling:
        modeling.write("from .rotary_glade import apply_rotary\n")
    with pytest.raises(FileNotFoundError, match=r"glade-push is missing rotary_glade.py$"):
        push_folder(model_dir, "org/glade-push", token=hub.token, endpoint=hub.url)
    assert hub.requests == []
    # ...and one this glade ships is not required where nothing imports it.
    for importer in ("decoding.py", "native_decoding.py"):
        code = model_dir / importer
        code.write_text(code.read_text(encoding="utf-8").replace("from .hardware import", "from os import"))
    (model_dir / "hardware.py").unlink()
    (model_dir / "rotary_glade.py").write_text("def apply_rotary(x):\n    return x\n")
    assert check_model_folder(model_dir) == model_dir


@pytest.mark.parametrize(
    "link, target",
    [("notes.txt", "../secrets/token.txt"), ("logs/run-1/notes.txt", "secrets/token.txt"), ("extras", "secrets")],
    ids=["relative-file-link", "nested-file-link", "directory-link"],
)
def test_a_link_out_of_the_folder_is_refused_before_any_request(hub, model_dir, tmp_path, link, target):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token.txt").write_text("hf_not_for_the_hub")
    (model_dir / link).parent.mkdir(parents=True, exist_ok=True)
    (model_dir / link).symlink_to(target if target.startswith("..") else tmp_path / target)
    with pytest.raises(ValueError) as raised:
        push_folder(model_dir, "org/glade-push", token=hub.token, endpoint=hub.url)
    resolved = os.path.realpath(tmp_path / target.removeprefix("../"))
    assert str(raised.value) == (
        f"{model_dir / link} links to {resolved}, outside {model_dir}: copy the file in or remove the link"
    )
    assert hub.requests == []


def test_links_inside_the_folder_are_pushed_as_the_files_they_name(hub, model_dir, tmp_path):
    (model_dir / "README.md").unlink()  # the card is written into a twin folder of links, which must still work
    (model_dir / "tokenizer-copy.json").symlink_to("tokenizer.json")
    (tmp_path / "latest").symlink_to(model_dir, target_is_directory=True)
    push_folder(tmp_path / "latest", "org/linked", token=hub.token, endpoint=hub.url)
    files = hub.files("org/linked")
    assert files["tokenizer-copy.json"] == (model_dir / "tokenizer.json").read_bytes()
    assert "README.md" in files


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
