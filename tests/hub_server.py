"""A stand-in for the Hugging Face Hub, small enough to read: the endpoints `huggingface_hub` 2.x calls to create
a repo, commit a folder (regular, base64 files; no LFS) and download files, served on 127.0.0.1.

Repos are snapshots of `{path: blob oid}` per commit; blob contents live in a directory as content-addressed files.
The wire format follows `huggingface_hub/hf_api.py` (create_repo, _validate_yaml, model_info, list_repo_tree),
`_commit_api.py` (_fetch_upload_modes, _send_commit) and `file_download.py` (get_hf_file_metadata).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "glade-tester"
ORGS = ("org",)


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob; the Hub reports it as `oid` and, quoted, as the `ETag` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, str]  # path -> blob oid


@dataclass
class Repo:
    private: bool
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return next((c for c in self.commits if c.oid == oid), None)


class HubError(Exception):
    """An error answer: status, `X-Error-Code` header and message."""

    def __init__(self, status: int, message: str, error_code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.error_code, self.extra = status, error_code, extra


class LocalHub:
    """Serve a fake Hub from `storage` on an ephemeral 127.0.0.1 port; use as a context manager.

    `fail_commits=N` answers the first N commit calls with 503 (a transient error) to exercise client retries.
    `requests` records `(method, path)` of every call so tests can count attempts.
    """

    def __init__(self, storage: Path, token: str = "hf_test_token", fail_commits: int = 0):
        self.blobs = Path(storage) / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.fail_commits = fail_commits
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # ---- server-side views for tests -------------------------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        return {path: self.read_blob(oid) for path, oid in commit.files.items()}

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for m, path in self.requests if m == method and re.fullmatch(pattern, path))

    # ---- storage ---------------------------------------------------------------------------------------------

    def read_blob(self, oid: str) -> bytes:
        return (self.blobs / oid).read_bytes()

    def write_blob(self, content: bytes) -> str:
        oid = git_blob_oid(content)
        (self.blobs / oid).write_bytes(content)
        return oid

    def repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):  # the Hub hides private repos as missing
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def commit(self, repo: Repo, branch: str, message: str, files: dict[str, str]) -> Commit:
        parent = repo.branches.get(branch, "")
        oid = hashlib.sha1(json.dumps([parent, message, sorted(files.items())]).encode()).hexdigest()
        commit = Commit(oid, message, files)
        repo.commits.append(commit)
        repo.branches[branch] = oid
        return commit


@contextmanager
def silent_server() -> Iterator[str]:
    """The URL of a server that accepts connections and never answers: the kernel completes the handshake for a
    listening socket, and nobody ever reads the request."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        host, port = listener.getsockname()
        yield f"http://{host}:{port}"


def refusing_url() -> str:
    """The URL of a port that was free a moment ago: nothing listens there, so connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host, port = probe.getsockname()
    return f"http://{host}:{port}"


def _handler_for(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    routes = [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", "commit"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", "model_info"),
        ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects

        def log_message(self, format, *args):  # keep pytest output clean; `hub.requests` is the log
            pass

        def do_GET(self):
            self.dispatch("GET")

        def do_HEAD(self):
            self.dispatch("HEAD")

        def do_POST(self):
            self.dispatch("POST")

        def dispatch(self, method: str) -> None:
            path = urlsplit(self.path).path
            with hub.lock:
                hub.requests.append((method, path))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                for route_method, pattern, name in routes:
                    match = re.fullmatch(pattern, path)
                    if route_method == method and match:
                        args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                        with hub.lock:
                            getattr(self, name)(body, **args)
                        return
                raise HubError(404, f"no route for {method} {path}")
            except HubError as error:
                headers = {"X-Error-Code": error.error_code} if error.error_code else {}
                self.send_json({"error": str(error), **error.extra}, status=error.status, headers=headers)

        # ---- helpers -----------------------------------------------------------------------------------------

        @property
        def authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def require_token(self) -> None:
            if not self.authorized:
                raise HubError(401, "Invalid credentials in Authorization header")

        def send_json(self, payload, status: int = 200, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def resolve_commit(self, repo_id: str, rev: str) -> Commit:
            commit = hub.repo(repo_id, self.authorized).resolve(rev)
            if commit is None:
                raise HubError(404, f"Revision {rev} not found in {repo_id}", "RevisionNotFound")
            return commit

        # ---- endpoints ---------------------------------------------------------------------------------------

        def whoami(self, body: bytes) -> None:
            self.require_token()
            self.send_json({
                "type": "user", "name": USER,
                "orgs": [{"type": "org", "name": org} for org in ORGS],
                "auth": {"type": "access_token", "accessToken": {"role": "write"}},
            })

        def create_repo(self, body: bytes) -> None:
            self.require_token()
            payload = json.loads(body)
            if payload.get("type", "model") != "model":
                raise HubError(400, "this stand-in Hub only hosts model repos")
            namespace = payload.get("organization") or USER
            if namespace not in (USER, *ORGS):
                raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace}")
            repo_id = f"{namespace}/{payload['name']}"
            if repo_id in hub.repos:  # the Hub names the existing repo; create_repo(exist_ok=True) returns it
                raise HubError(409, "You already created this model repo", url=f"{hub.url}/{repo_id}")
            repo = hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            hub.commit(repo, "main", "initial commit", {})
            self.send_json({"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def validate_yaml(self, body: bytes) -> None:
            content = json.loads(body)["content"]
            match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
            if match is None:
                self.send_json({"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
                return
            try:
                metadata = yaml.safe_load(match.group(1))
            except yaml.YAMLError as error:
                self.send_json({"errors": [{"message": f"invalid YAML: {error}"}]}, status=400)
                return
            if not isinstance(metadata, dict):
                self.send_json({"errors": [{"message": "metadata must be a YAML mapping"}]}, status=400)
                return
            self.send_json({"errors": [], "warnings": []})

        def preupload(self, body: bytes, repo: str, rev: str) -> None:
            self.require_token()
            commit = self.resolve_commit(repo, rev)
            files = [
                # "regular" for everything: content then travels base64-encoded inside the commit call (no LFS).
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": commit.files.get(f["path"])}
                for f in json.loads(body)["files"]
            ]
            self.send_json({"files": files, "commitOid": commit.oid})

        def commit(self, body: bytes, repo: str, rev: str) -> None:
            self.require_token()
            if hub.fail_commits > 0:
                hub.fail_commits -= 1
                raise HubError(503, "Service Unavailable")
            target = hub.repo(repo, authorized=True)
            if rev not in target.branches:
                raise HubError(404, f"Branch {rev} not found in {repo}", "RevisionNotFound")
            files = dict(target.resolve(rev).files)
            message = ""
            for line in body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value["summary"]
                elif key == "file" and value.get("encoding") == "base64":
                    files[value["path"]] = hub.write_blob(base64.b64decode(value["content"]))
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: oid for p, oid in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(422, f"unsupported commit operation {key!r}")
            commit = hub.commit(target, rev, message, files)
            self.send_json({"commitUrl": f"{hub.url}/{repo}/commit/{commit.oid}", "commitOid": commit.oid,
                            "pullRequestUrl": None})

        def model_info(self, body: bytes, repo: str, rev: str = "main") -> None:
            commit = self.resolve_commit(repo, rev)
            namespace = repo.split("/")[0]
            self.send_json({
                "id": repo, "modelId": repo, "author": namespace, "sha": commit.oid,
                "private": hub.repos[repo].private, "tags": [], "downloads": 0, "likes": 0,
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            })

        def tree(self, body: bytes, repo: str, rev: str, path: str = "") -> None:
            commit = self.resolve_commit(repo, rev)
            prefix = path.strip("/") + "/" if path else ""
            recursive = parse_qs(urlsplit(self.path).query).get("recursive") == ["true"]
            entries, folders = [], set()
            for p, oid in sorted(commit.files.items()):
                if not p.startswith(prefix):
                    continue
                folder, _, rest = p[len(prefix):].partition("/")
                if rest and not recursive:  # the Hub lists a folder's direct children only
                    folders.add(prefix + folder)
                else:
                    entries.append({"type": "file", "path": p, "oid": oid, "size": (hub.blobs / oid).stat().st_size})
            if prefix and not entries and not folders:
                raise HubError(404, f"Entry {path} not found in {repo}", "EntryNotFound")
            self.send_json([{"type": "directory", "path": f, "oid": ""} for f in sorted(folders)] + entries)

        def resolve(self, body: bytes, repo: str, rev: str, path: str) -> None:
            commit = self.resolve_commit(repo, rev)
            oid = commit.files.get(path)
            if oid is None:
                raise HubError(404, f"Entry {path} not found in {repo}", "EntryNotFound")
            content = hub.read_blob(oid)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(content)))
            self.send_header("ETag", f'"{oid}"')
            self.send_header("X-Repo-Commit", commit.oid)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(content)

    return Handler
