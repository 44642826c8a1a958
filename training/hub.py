"""Publish a saved Glade checkpoint to the Hugging Face Hub in one commit: `push_folder` and `glade push`.

The Hub is found through `HF_ENDPOINT` and the token through `HF_TOKEN` (or `hf auth login`), as everywhere in
huggingface_hub.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from accelerate import PartialState
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, HTTPError
from huggingface_hub.utils import set_client_factory, validate_repo_id
from huggingface_hub.utils._http import default_client_factory  # the library's own client, not re-exported
from transformers.dynamic_module_utils import get_relative_imports

from glade.loading import safetensors_files

from .model_card import write_model_card

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
DEFAULT_COMMIT_MESSAGE = "Upload Glade model"
# Seconds one request may wait to connect, send or receive; a commit of many files takes the Hub a while to answer.
DEFAULT_TIMEOUT_SECONDS = 60.0


class HubPushError(OSError):
    """The Hub could not be reached, or refused the upload; the message says which, in one line."""


def check_model_folder(folder: str | Path) -> Path:
    """Raise unless `folder` is a complete, publishable checkpoint: FileNotFoundError naming what is missing from
    config.json, the safetensors weights (single file or index + shards) and the remote code (see
    `_remote_code_files`); ValueError naming a symlink that leads out of the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    _check_links_stay_inside(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: save the model with save_pretrained first")
    required = [*safetensors_files(folder), *_remote_code_files(folder, config_path)]
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is missing {', '.join(missing)}")
    return folder


def _check_links_stay_inside(folder: Path) -> None:
    """Refuse a symlink, at any depth, whose target lies outside `folder`: the upload would publish what it points
    at. Links that stay inside are harmless. `folder` itself may be a link (a `latest` alias of a checkpoint)."""
    root = Path(os.path.realpath(folder))
    # os.walk does not descend into linked directories, so each link is judged once, where it sits.
    for parent, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(parent, name)
            if not path.is_symlink():
                continue
            target = Path(os.path.realpath(path))  # unlike Path.resolve, realpath does not raise on a link loop
            if not target.is_relative_to(root):
                raise ValueError(f"{path} links to {target}, outside {folder}: copy the file in or remove the link")


def _remote_code_modules(config_path: Path) -> list[str]:
    """Modules named by the config's auto_map ("modeling_glade.GladeForCausalLM"): trust_remote_code needs them.
    References into another repository ("org/repo--module.Class") are served from there and are skipped."""
    refs = []
    for value in json.loads(config_path.read_text(encoding="utf-8")).get("auto_map", {}).values():
        refs += value if isinstance(value, list) else [value]
    return sorted({ref.split(".")[0] for ref in refs if ref and "--" not in ref})


def _remote_code_files(folder: Path, config_path: Path) -> list[str]:
    """The auto_map modules and every module they import relatively, recursively, as file names: transformers
    fetches all of them to load the folder with trust_remote_code, so the folder's own code (whichever glade saved
    it) decides what is required. Imports are read by transformers' own `get_relative_imports`; its recursive
    `get_relative_import_files` stops at the first missing file, and every missing file should be named at once."""
    names = [f"{module}.py" for module in _remote_code_modules(config_path)]
    for name in names:  # grows while walked: each present module adds the imports not yet listed
        if (folder / name).is_file():
            names += sorted({f"{module}.py" for module in get_relative_imports(folder / name)} - set(names))
    return sorted(names)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    revision: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    endpoint: str | None = None,
) -> str | None:
    """Create `repo_id` if needed and upload `folder` to it in a single commit; returns the commit URL.

    A folder without a README.md gets a model card written from its config and metrics.jsonl (see
    `write_model_card`); the card goes into the upload, not into `folder`. Every request waits at most `timeout`
    seconds. Retries are huggingface_hub's own (the calls it can safely repeat, at most 5 times); a failure raises
    HubPushError with a one-line message. Under `accelerate launch` only the main process pushes; the other ranks
    return None at once (wait for the push with `accelerator.wait_for_everyone()` if they must).
    """
    if not PartialState().is_main_process:
        return None
    validate_repo_id(repo_id)
    if not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    folder = check_model_folder(folder)
    api = HfApi(endpoint=endpoint, token=token)
    with _folder_with_card(folder, repo_id) as upload, _request_timeout(timeout):
        if repo_id not in (upload / CARD_NAME).read_text(encoding="utf-8"):
            logger.warning("the model card in %s does not mention %s: its usage snippets load another id",
                           folder, repo_id)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=upload, commit_message=commit_message, revision=revision,
                repo_type="model",
            )
        except HTTPError as error:
            raise HubPushError(_one_line(error, repo_id, api.endpoint)) from error
    return commit.commit_url


@contextmanager
def _folder_with_card(folder: Path, repo_id: str) -> Iterator[Path]:
    """`folder` itself when it has a model card; otherwise a temporary twin of it (links to its files) with a card
    written from what it holds, so that pushing never writes into the user's folder."""
    if (folder / CARD_NAME).is_file():
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="glade-push-") as staging:
        twin = Path(staging)
        for path in folder.rglob("*"):
            if path.is_file():
                link = twin / path.relative_to(folder)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(path.resolve())
        write_model_card(twin, repo_id=repo_id)
        logger.warning("%s has no %s: pushing a card written from its config and metrics", folder, CARD_NAME)
        yield twin


@contextmanager
def _request_timeout(seconds: float) -> Iterator[None]:
    """Give every huggingface_hub request a deadline: its shared client waits for an answer forever (timeout=None),
    so a server that accepts a connection and never answers would hang the push. The library's default client is
    reinstated afterwards (a factory set earlier with `set_client_factory` is not)."""

    def bounded_client_factory():
        client = default_client_factory()
        client.timeout = seconds
        return client

    set_client_factory(bounded_client_factory)
    try:
        yield
    finally:
        set_client_factory(default_client_factory)


def _one_line(error: HTTPError, repo_id: str, endpoint: str) -> str:
    if isinstance(error, HfHubHTTPError):
        response = error.response
        reason = " ".join((error.server_message or response.reason_phrase).split())
        return (f"cannot push to {repo_id}: {endpoint} answered {response.status_code} to {response.request.method} "
                f"{response.request.url.path}: {reason}")
    # Raised without a response: refused or reset connections, timeouts, unknown hosts.
    return f"cannot push to {repo_id}: no answer from {endpoint} ({type(error).__name__}: {error})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`glade push`."""
    parser.description = "Create ORG/NAME on the Hub (HF_ENDPOINT) if needed and upload DIR in one commit."
    parser.add_argument(
        "folder", metavar="DIR", help="a save_pretrained folder; without a README.md, a card is written for the upload"
    )
    parser.add_argument("repo_id", metavar="ORG/NAME", help="the Hub repository to push to")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, metavar="SECONDS",
                        help=f"the longest one request may wait for the Hub (default: {DEFAULT_TIMEOUT_SECONDS:g})")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    url = push_folder(
        args.folder, args.repo_id, private=args.private, token=args.token, commit_message=args.commit_message,
        revision=args.revision, timeout=args.timeout,
    )
    print(url)
