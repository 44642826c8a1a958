"""Publish a saved Glade checkpoint to the Hugging Face Hub in one commit: `push_folder` and `glade push`.

The Hub is found through `HF_ENDPOINT` and the token through `HF_TOKEN` (or `hf auth login`), as everywhere in
huggingface_hub.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from time import sleep

from accelerate import PartialState
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, HTTPError
from huggingface_hub.utils import validate_repo_id

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Besides every 5xx (the Hub failed on its side), these are worth retrying: a request timeout and throttling.
TRANSIENT_STATUS_CODES = {408, 429}
DEFAULT_COMMIT_MESSAGE = "Upload Glade model"


def check_model_folder(folder: str | Path) -> Path:
    """Raise FileNotFoundError naming what is missing unless `folder` is a complete, publishable checkpoint:
    config.json, safetensors weights (single file or index + shards), the remote code its auto_map names, and a
    README.md model card."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: save the model with save_pretrained first")
    required = [*_weight_files(folder), *(f"{module}.py" for module in _remote_code_modules(config_path)), "README.md"]
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        hint = " (write the card with glade.training.model_card.write_model_card)" if "README.md" in missing else ""
        raise FileNotFoundError(f"{folder} is missing {', '.join(missing)}{hint}")
    return folder


def _weight_files(folder: Path) -> list[str]:
    if (folder / WEIGHTS_INDEX_NAME).is_file():
        index = json.loads((folder / WEIGHTS_INDEX_NAME).read_text(encoding="utf-8"))
        return sorted(set(index["weight_map"].values()))
    return [WEIGHTS_NAME]


def _remote_code_modules(config_path: Path) -> list[str]:
    """Modules named by the config's auto_map ("modeling_glade.GladeForCausalLM"): trust_remote_code needs them.
    References into another repository ("org/repo--module.Class") are served from there and are skipped."""
    refs = []
    for value in json.loads(config_path.read_text(encoding="utf-8")).get("auto_map", {}).values():
        refs += value if isinstance(value, list) else [value]
    return sorted({ref.split(".")[0] for ref in refs if ref and "--" not in ref})


def is_transient(error: Exception) -> bool:
    """Whether retrying could help: connection-level failures, timeouts, throttling and server errors.

    Client errors (401 bad token, 403, 404 unknown repo or revision, ...) would fail the same way again."""
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code
        return status in TRANSIENT_STATUS_CODES or status >= 500
    return isinstance(error, HTTPError)  # raised without a response: the request never completed


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    revision: str | None = None,
    retries: int = 3,
    backoff_seconds: float = 2.0,
    endpoint: str | None = None,
) -> str | None:
    """Create `repo_id` if needed and upload `folder` to it in a single commit; returns the commit URL.

    Under `accelerate launch` only the main process pushes; the other ranks return None at once (wait for the
    push with `accelerator.wait_for_everyone()` if they must). Transient failures (see `is_transient`) are retried
    up to `retries` times, sleeping `backoff_seconds`, then twice that, and so on; others raise immediately.
    """
    if not PartialState().is_main_process:
        return None
    validate_repo_id(repo_id)
    folder = check_model_folder(folder)
    if repo_id not in (folder / "README.md").read_text(encoding="utf-8"):
        logger.warning("the model card in %s does not mention %s; pass repo_id= to write_model_card", folder, repo_id)

    api = HfApi(endpoint=endpoint, token=token)
    attempt = 0
    while True:
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            # One commit for a checkpoint-sized folder. With hf_xet installed, huggingface_hub also retries the
            # commit call itself, and splits only folders too large for one commit.
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision,
                repo_type="model",
            )
            return commit.commit_url
        except Exception as error:
            if attempt == retries or not is_transient(error):
                raise
            delay = backoff_seconds * 2**attempt
            logger.warning("push to %s failed (%s); retrying in %.1f s", repo_id, error, delay)
            sleep(delay)
            attempt += 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`glade push`."""
    parser.description = "Create ORG/NAME on the Hub (HF_ENDPOINT) if needed and upload DIR in one commit."
    parser.add_argument("folder", metavar="DIR", help="a save_pretrained folder with a README.md model card")
    parser.add_argument("repo_id", metavar="ORG/NAME", help="the Hub repository to push to")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    url = push_folder(
        args.folder, args.repo_id, private=args.private, token=args.token, commit_message=args.commit_message,
        revision=args.revision,
    )
    print(url)
