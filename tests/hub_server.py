"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only).

It answers the calls that ``huggingface_hub`` 2.x makes for ``create_repo``, ``repo_info``/``model_info``,
``repo_exists``, ``list_repo_files``/``list_repo_tree``, ``list_repo_refs``, ``list_repo_commits``,
``create_branch``/``create_tag``, ``upload_file``/``upload_folder``/``create_commit`` (preupload, LFS
batch + PUT, ndjson commit with regular files, LFS files and deletions, ``create_pr``), ``hf_hub_download``,
``snapshot_download`` and ``file_exists``; so ``timm`` (``hf-hub:`` ids) and ``transformers``
(``from_pretrained``/``push_to_hub``) work against it too.

Usage in a test module (or in ``tests/conftest.py``)::

    from hub_server import hub_server  # noqa: F401  (the fixture)

    def test_push(hub_server):
        hub_server.seed_repo("org/parent", "path/to/model_folder")
        ...  # code under test talks to the server through huggingface_hub
        assert not hub_server.find_requests("POST", "/commit/")

Outside pytest use :class:`HubServer` as a context manager together with :func:`point_hub_at`.
Repositories live in memory; every request is recorded in :attr:`HubServer.requests`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import sys
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = [
    "Commit",
    "HubServer",
    "RecordedRequest",
    "Repo",
    "StoredFile",
    "hub_server",
    "isolate_hf_home",
    "point_hub_at",
]

DUMMY_TOKEN = "hf_test_dummy_token"
DEFAULT_USER = "test-user"
_TYPE_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_PLURAL_TO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
# Extensions the Hub's default .gitattributes sends to LFS (subset).
LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".ot",
    ".npy",
    ".npz",
    ".pkl",
    ".pickle",
    ".joblib",
    ".model",
    ".tflite",
    ".gguf",
    ".arrow",
    ".parquet",
    ".zip",
    ".gz",
    ".tar",
    ".tgz",
    ".xz",
    ".7z",
    ".zst",
    ".rar",
    ".png",
    ".jpg",
    ".jpeg",
    ".wav",
    ".mp3",
    ".mp4",
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
DEFAULT_GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _is_lfs(path: str, size: int, sample: bytes) -> bool:
    """The Hub's choice between LFS and a regular git blob, approximated."""
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD or b"\0" in sample


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit: its bytes and the oids the Hub reports for it."""

    content: bytes
    lfs: bool

    @property
    def size(self) -> int:
        """Size of the file in bytes."""
        return len(self.content)

    @property
    def sha256(self) -> str:
        """sha256 of the content (the LFS oid)."""
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer file that git stores for an LFS file."""
        return _lfs_pointer(self.sha256, self.size)

    @property
    def git_oid(self) -> str:
        """git blob oid (of the pointer file for LFS files)."""
        return _git_blob_oid(self.pointer if self.lfs else self.content)

    @property
    def etag(self) -> str:
        """ETag served on /resolve (sha256 for LFS files, git oid otherwise)."""
        return self.sha256 if self.lfs else self.git_oid

    @property
    def upload_oid(self) -> str:
        """The oid the preupload endpoint reports (compared by the client to skip unchanged files)."""
        return self.sha256 if self.lfs else self.git_oid

    def tree_entry(self, path: str) -> dict[str, Any]:
        """Entry as returned by ``/api/{type}s/{repo}/tree/{rev}``."""
        entry: dict[str, Any] = {"type": "file", "path": path, "size": self.size, "oid": self.git_oid}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(self.pointer)}
        return entry


@dataclass
class Commit:
    """A commit: full snapshot of the repo files."""

    oid: str
    parents: list[str]
    title: str
    message: str
    date: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    """A repository with its refs (branches, tags, ``refs/pr/N``) and commits."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def head(self) -> str:
        """Commit sha of ``main``."""
        return self.branches["main"]

    def resolve(self, revision: str | None) -> str | None:
        """Commit sha for a branch, tag, ``refs/pr/N`` or (possibly short) commit sha; None if unknown."""
        rev = revision or "main"
        for prefix in ("refs/heads/", "refs/tags/"):
            if rev.startswith(prefix):
                rev = rev[len(prefix) :]
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        match = re.fullmatch(r"refs/pr/(\d+)", rev)
        if match:
            return self.pull_requests.get(int(match[1]))
        if rev in self.commits:
            return rev
        if len(rev) >= 7 and re.fullmatch(r"[0-9a-f]+", rev):
            found = [sha for sha in self.commits if sha.startswith(rev)]
            if len(found) == 1:
                return found[0]
        return None

    def files_at(self, revision: str | None = "main") -> dict[str, StoredFile]:
        """Files at a revision (KeyError if unknown)."""
        sha = self.resolve(revision)
        if sha is None:
            raise KeyError(revision)
        return self.commits[sha].files


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str  # without the query string, percent-encoding kept as sent
    query: dict[str, list[str]]
    authorized: bool  # whether an ``Authorization`` header was sent

    @property
    def route(self) -> tuple[str, str]:
        """``(method, path)``."""
        return (self.method, self.path)


class HubError(Exception):
    """An error answer: status, Hub error code (``X-Error-Code``) and message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def _repo_not_found() -> HubError:
    return HubError(404, "Repository not found", "RepoNotFound")


class HubServer:
    """In-memory Hub-compatible server on ``127.0.0.1`` (free port), served from a daemon thread.

    Args:
        create_branch_on_commit: a commit (or preupload) to an unknown branch name creates the branch from
            ``main`` (the real Hub wants ``create_branch`` first; transformers does call it).
        require_auth_for_writes: writes without an ``Authorization`` header answer 401.
        write_tokens: when given, only these bearer tokens may write: a write with no token answers 401, one
            with another token 403 (like a read-only or foreign token on the Hub). Tokens are never recorded.
    """

    def __init__(
        self,
        *,
        create_branch_on_commit: bool = True,
        require_auth_for_writes: bool = True,
        write_tokens: Collection[str] | None = None,
    ) -> None:
        self.create_branch_on_commit = create_branch_on_commit
        self.require_auth_for_writes = require_auth_for_writes
        self.write_tokens = None if write_tokens is None else frozenset(write_tokens)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[RecordedRequest] = []
        self.unhandled: list[RecordedRequest] = []
        self._lock = threading.RLock()
        self._commit_counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``."""
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        """Bind a free port and serve in a daemon thread."""
        if self._httpd is not None:
            return self
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.hub = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and the clients' keep-alive connections."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ direct access for tests
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repo (KeyError if missing)."""
        return self.repos[(repo_type, repo_id)]

    def has_repo(self, repo_id: str, repo_type: str = "model") -> bool:
        """Whether the repo exists."""
        return (repo_type, repo_id) in self.repos

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Sorted file paths at a revision."""
        return sorted(self.repo(repo_id, repo_type).files_at(revision))

    def file_bytes(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        """Content of one file at a revision."""
        return self.repo(repo_id, repo_type).files_at(revision)[path].content

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo (with the initial ``.gitattributes`` commit) unless it exists; return it."""
        with self._lock:
            key = (repo_type, repo_id)
            if key not in self.repos:
                repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
                files = {".gitattributes": StoredFile(DEFAULT_GITATTRIBUTES, lfs=False)}
                sha = self._new_commit(repo, [], "initial commit", "", files)
                repo.branches["main"] = sha
                self.repos[key] = repo
            return self.repos[key]

    def seed_repo(
        self,
        repo_id: str,
        folder_or_files: str | Path | Mapping[str, bytes | str | Path],
        *,
        repo_type: str = "model",
        revision: str = "main",
        private: bool = False,
        commit_message: str = "Seed files",
    ) -> str:
        """Put a folder (``.git``/``.cache`` skipped) or ``{path_in_repo: bytes|str|Path}`` into a repo.

        Creates the repo if needed and commits on top of branch ``revision`` (created from ``main`` if new).
        Returns the new commit sha. No request is recorded.
        """
        if revision.startswith("refs/") or _SHA1_RE.match(revision):
            raise ValueError(f"seed_repo commits to a branch name, not {revision!r}")
        files: dict[str, bytes] = {}
        if isinstance(folder_or_files, Mapping):
            for name, value in folder_or_files.items():
                if isinstance(value, Path):
                    files[name] = value.read_bytes()
                elif isinstance(value, str):
                    files[name] = value.encode()
                else:
                    files[name] = bytes(value)
        else:
            root = Path(folder_or_files)
            if not root.is_dir():
                raise ValueError(f"{root} is not a directory")
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root)
                if path.is_file() and not {".git", ".cache"} & set(rel.parts):
                    files[rel.as_posix()] = path.read_bytes()
        with self._lock:
            repo = self.create_repo(repo_id, repo_type=repo_type, private=private)
            parent = repo.resolve(revision) or repo.head
            snapshot = dict(repo.commits[parent].files)
            for name, content in files.items():
                lfs = _is_lfs(name, len(content), content[:512])
                stored = StoredFile(content, lfs=lfs)
                if lfs:
                    self.lfs_objects[stored.sha256] = content
                snapshot[name] = stored
            sha = self._new_commit(repo, [parent], commit_message, "", snapshot)
            repo.branches[revision] = sha
            return sha

    # ------------------------------------------------------------------ request log helpers
    def find_requests(self, method: str | None = None, contains: str = "") -> list[RecordedRequest]:
        """Recorded requests with this method (any if None) whose path contains ``contains``."""
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method) and contains in unquote(r.path)]

    def commit_requests(self) -> list[RecordedRequest]:
        """The ``POST .../commit/{revision}`` requests."""
        return [r for r in self.find_requests("POST") if re.search(r"^/api/\w+/[^/]+/[^/]+/commit/", r.path)]

    def clear_requests(self) -> None:
        """Forget recorded requests."""
        with self._lock:
            self.requests.clear()
            self.unhandled.clear()

    # ------------------------------------------------------------------ internals
    def _new_commit(
        self, repo: Repo, parents: list[str], title: str, message: str, files: dict[str, StoredFile]
    ) -> str:
        self._commit_counter += 1
        digest = hashlib.sha1()
        digest.update(json.dumps([repo.repo_type, repo.repo_id, self._commit_counter, parents, title]).encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].git_oid}\n".encode())
        sha = digest.hexdigest()
        repo.commits[sha] = Commit(sha, parents, title, message, _now(), files)
        return sha

    def _url(self, repo: Repo, suffix: str = "") -> str:
        return f"{self.endpoint}/{_TYPE_PREFIX[repo.repo_type]}{repo.repo_id}{suffix}"

    def _get_repo(self, repo_type: str, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise _repo_not_found()
        return repo

    def _resolve(self, repo: Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def _repo_info(self, repo: Repo, revision: str | None, blobs: bool) -> dict[str, Any]:
        sha = self._resolve(repo, revision or "main")
        commit = repo.commits[sha]
        siblings = []
        for path in sorted(commit.files):
            stored = commit.files[path]
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=stored.size, blobId=stored.git_oid)
                if stored.lfs:
                    sibling["lfs"] = {
                        "size": stored.size,
                        "sha256": stored.sha256,
                        "pointerSize": len(stored.pointer),
                    }
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.size for f in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            config = commit.files.get("config.json")
            if config is not None:
                try:
                    data = json.loads(config.content)
                except ValueError:
                    data = None
                if isinstance(data, dict):
                    info["config"] = {k: data[k] for k in ("architectures", "model_type") if k in data}
        elif repo.repo_type == "space":
            info.update(sdk="static", runtime={"stage": "RUNNING", "hardware": {"current": None, "requested": None}})
        return info

    def _tree(self, repo: Repo, revision: str, path: str, recursive: bool) -> list[dict[str, Any]]:
        sha = self._resolve(repo, revision)
        files = repo.commits[sha].files
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and prefix.rstrip("/") in files:
            return [files[prefix.rstrip("/")].tree_entry(prefix.rstrip("/"))]
        below = {p: f for p, f in files.items() if p.startswith(prefix)}
        if prefix and not below:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound", {"X-Repo-Commit": sha})
        entries: dict[str, dict[str, Any]] = {}
        for file_path, stored in sorted(below.items()):
            rest = file_path[len(prefix) :].split("/")
            depth = len(rest) if recursive else 1
            for i in range(1, min(depth, len(rest) - 1) + 1):
                folder = prefix + "/".join(rest[:i])
                oid = hashlib.sha1(f"{sha}:{folder}".encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": oid, "size": 0})
            if recursive or len(rest) == 1:
                entries[file_path] = stored.tree_entry(file_path)
        return [entries[k] for k in sorted(entries, key=lambda p: (entries[p]["type"] != "directory", p))]

    def _commit(
        self, repo: Repo, revision: str, lines: list[dict[str, Any]], create_pr: bool
    ) -> tuple[Repo, str, int | None]:
        header = next((line["value"] for line in lines if line.get("key") == "header"), {})
        base = repo.resolve(revision)
        if base is None:
            if create_pr or not self.create_branch_on_commit or _SHA1_RE.match(revision) or "refs/" in revision:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            base = repo.head
        elif not create_pr and revision not in repo.branches and not revision.startswith("refs/pr/"):
            raise HubError(400, f"Cannot commit to {revision}: not a branch")
        parent_commit = header.get("parentCommit")
        if parent_commit and not base.startswith(parent_commit):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[base].files)
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')}")
                content = base64.b64decode(value["content"])
                files[value["path"]] = StoredFile(content, lfs=False)
            elif key == "lfsFile":
                content = self.lfs_objects.get(value["oid"])
                if content is None:
                    raise HubError(400, f"LFS object {value['oid']} for {value['path']} was not uploaded")
                files[value["path"]] = StoredFile(content, lfs=True)
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(folder)]
                if not doomed:
                    raise HubError(404, "A folder with this name doesn't exist", "EntryNotFound")
                for p in doomed:
                    del files[p]
            elif key != "header":
                raise HubError(400, f"Unknown commit operation {key!r}")
        sha = self._new_commit(repo, [base], header.get("summary", ""), header.get("description", ""), files)
        pr_num = None
        if create_pr:
            pr_num = max([*repo.pull_requests, 0]) + 1
            repo.pull_requests[pr_num] = sha
        elif revision.startswith("refs/pr/"):
            repo.pull_requests[int(revision.rsplit("/", 1)[1])] = sha
        else:
            repo.branches[revision] = sha
        return repo, sha, pr_num

    def _handle(self, h: _Handler, method: str, raw_path: str, query: dict[str, list[str]], body: bytes) -> None:
        """Route one request (raises HubError for error answers)."""
        authorized = bool(h.headers.get("Authorization"))
        parts = [unquote(p) for p in raw_path.split("/")[1:]]
        if parts and parts[-1] == "" and len(parts) > 1:
            parts = parts[:-1]

        def need_auth() -> None:
            if (self.require_auth_for_writes or self.write_tokens is not None) and not authorized:
                raise HubError(401, "Invalid credentials in Authorization header")
            if self.write_tokens is not None:
                scheme, _, token = h.headers.get("Authorization", "").partition(" ")
                if scheme.lower() != "bearer" or token.strip() not in self.write_tokens:
                    raise HubError(403, "You don't have the rights to write to this repository")

        def jbody() -> Any:
            try:
                return json.loads(body or b"{}")
            except ValueError as err:
                raise HubError(400, f"Invalid JSON body: {err}") from err

        # ---- non-repo API routes
        if parts == ["api", "repos", "create"] and method == "POST":
            need_auth()
            payload = jbody()
            repo_type = payload.get("type") or "model"
            repo_id = f"{payload.get('organization') or DEFAULT_USER}/{payload['name']}"
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            with self._lock:
                exists = (repo_type, repo_id) in self.repos
                repo = self.create_repo(repo_id, repo_type=repo_type, private=private)
            answer = {
                "url": self._url(repo),
                "name": repo_id,
                "id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            }
            if exists:
                return h.send_json(409, {"error": "You already created this repo", **answer})
            return h.send_json(200, answer)
        if parts == ["api", "repos", "delete"] and method in ("POST", "DELETE"):
            need_auth()
            payload = jbody()
            key = (
                payload.get("type") or "model",
                f"{payload.get('organization') or DEFAULT_USER}/{payload['name']}",
            )
            with self._lock:
                if self.repos.pop(key, None) is None:
                    raise _repo_not_found()
            return h.send_json(200, {})
        if parts == ["api", "validate-yaml"] and method == "POST":
            return h.send_json(200, {"errors": [], "warnings": []})
        if parts == ["api", "whoami-v2"] and method == "GET":
            if not authorized:
                raise HubError(401, "Invalid credentials in Authorization header")
            return h.send_json(
                200,
                {
                    "type": "user",
                    "id": "0" * 24,
                    "name": DEFAULT_USER,
                    "fullname": "Test User",
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
                },
            )
        if parts == ["api", "agent-harnesses"]:
            return h.send_json(200, {"standardEnvVars": [], "harnesses": {}})
        if len(parts) == 3 and parts[0] in ("lfs-upload", "lfs-verify"):
            oid, size = parts[1], int(parts[2])
            if parts[0] == "lfs-upload" and method == "PUT":
                if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
                    raise HubError(400, "Uploaded content does not match the announced oid/size")
                with self._lock:
                    self.lfs_objects[oid] = body
                return h.send_json(200, {}, extra={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
            if parts[0] == "lfs-verify" and method == "POST":
                if oid not in self.lfs_objects:
                    raise HubError(404, f"LFS object {oid} not found")
                return h.send_json(200, {})

        # ---- /api/{models,datasets,spaces}/{ns}/{name}[/...]
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in _PLURAL_TO_TYPE:
            repo_type = _PLURAL_TO_TYPE[parts[1]]
            repo_id = f"{parts[2]}/{parts[3]}"
            action, rest = (parts[4], parts[5:]) if len(parts) > 4 else ("", [])
            with self._lock:
                repo = self._get_repo(repo_type, repo_id, authorized)
                blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
                if method == "GET" and action == "":
                    return h.send_json(200, self._repo_info(repo, None, blobs))
                if method == "GET" and action == "revision" and rest:
                    return h.send_json(200, self._repo_info(repo, "/".join(rest), blobs))
                if method == "GET" and action == "tree" and rest:
                    recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                    return h.send_json(200, self._tree(repo, rest[0], "/".join(rest[1:]), recursive))
                if method == "POST" and action == "paths-info" and rest:
                    sha = self._resolve(repo, "/".join(rest))
                    form = parse_qs(body.decode(), keep_blank_values=True)
                    wanted = form.get("paths", []) or jbody().get("paths", [])
                    files = repo.commits[sha].files
                    out = [files[p].tree_entry(p) for p in wanted if p in files]
                    out += [
                        {
                            "type": "directory",
                            "path": p,
                            "oid": hashlib.sha1(f"{sha}:{p}".encode()).hexdigest(),
                        }
                        for p in wanted
                        if p not in files and any(f.startswith(p.rstrip("/") + "/") for f in files)
                    ]
                    return h.send_json(200, out)
                if method == "GET" and action == "refs":

                    def ref(name: str, full: str, sha: str) -> dict[str, str]:
                        return {"name": name, "ref": full, "targetCommit": sha}

                    return h.send_json(
                        200,
                        {
                            "branches": [ref(b, f"refs/heads/{b}", s) for b, s in sorted(repo.branches.items())],
                            "tags": [ref(t, f"refs/tags/{t}", s) for t, s in sorted(repo.tags.items())],
                            "converts": [],
                            "pullRequests": [
                                ref(f"refs/pr/{n}", f"refs/pr/{n}", s) for n, s in sorted(repo.pull_requests.items())
                            ],
                        },
                    )
                if method == "GET" and action == "commits":
                    sha: str | None = self._resolve(repo, "/".join(rest) or "main")
                    history = []
                    while sha is not None:
                        commit = repo.commits[sha]
                        history.append(
                            {
                                "id": commit.oid,
                                "title": commit.title,
                                "message": commit.message,
                                "date": commit.date,
                                "authors": [{"user": DEFAULT_USER}],
                            }
                        )
                        sha = commit.parents[0] if commit.parents else None
                    return h.send_json(200, history)
                if method == "POST" and action == "preupload" and rest:
                    need_auth()
                    payload = jbody()
                    base = repo.resolve("/".join(rest))
                    revision = "/".join(rest)
                    if base is None and (
                        not self.create_branch_on_commit or query.get("create_pr") or "refs/" in revision
                    ):
                        raise HubError(404, f"Invalid rev id: {'/'.join(rest)}", "RevisionNotFound")
                    existing = repo.commits[base or repo.head].files
                    answer = []
                    for item in payload.get("files", []):
                        sample = base64.b64decode(item.get("sample", ""))
                        lfs = _is_lfs(item["path"], int(item.get("size", 0)), sample)
                        current = existing.get(item["path"])
                        answer.append(
                            {
                                "path": item["path"],
                                "uploadMode": "lfs" if lfs else "regular",
                                "shouldIgnore": False,
                                "oid": current.upload_oid if current is not None and current.lfs == lfs else None,
                            }
                        )
                    return h.send_json(200, {"files": answer, "commitOid": base or repo.head})
                if method == "POST" and action == "commit" and rest:
                    need_auth()
                    try:
                        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    except ValueError as err:
                        raise HubError(400, f"Invalid ndjson: {err}") from err
                    create_pr = query.get("create_pr", ["0"])[0] in ("1", "true", "True")
                    repo, sha, pr_num = self._commit(repo, "/".join(rest), lines, create_pr)
                    answer = {
                        "success": True,
                        "commitOid": sha,
                        "commitUrl": self._url(repo, f"/commit/{sha}"),
                        "hookOutput": "",
                    }
                    if pr_num is not None:
                        answer["pullRequestUrl"] = self._url(repo, f"/discussions/{pr_num}")
                    return h.send_json(200, answer)
                if action == "branch" and rest:
                    need_auth()
                    branch = "/".join(rest)
                    if method == "POST":
                        if branch in repo.branches:
                            raise HubError(409, f"Reference {branch} already exists")
                        start = jbody().get("startingPoint") or "main"
                        repo.branches[branch] = self._resolve(repo, start)
                        return h.send_json(200, {})
                    if method == "DELETE":
                        if branch not in repo.branches or branch == "main":
                            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                        del repo.branches[branch]
                        return h.send_json(200, {})
                if action == "tag" and rest:
                    need_auth()
                    if method == "POST":
                        tag = jbody()["tag"]
                        if tag in repo.tags:
                            raise HubError(409, f"Tag {tag} already exists")
                        repo.tags[tag] = self._resolve(repo, "/".join(rest))
                        return h.send_json(200, {})
                    if method == "DELETE":
                        if repo.tags.pop("/".join(rest), None) is None:
                            raise HubError(404, f"Invalid rev id: {'/'.join(rest)}", "RevisionNotFound")
                        return h.send_json(200, {})
                if method == "PUT" and action == "settings":
                    need_auth()
                    payload = jbody()
                    if "private" in payload:
                        repo.private = bool(payload["private"])
                    if "visibility" in payload:
                        repo.private = payload["visibility"] == "private"
                    return h.send_json(200, {})
            raise HubError(404, f"Unhandled route {method} {raw_path}")

        # ---- LFS batch: /{prefix}{ns}/{name}.git/info/lfs/objects/batch
        if method == "POST" and parts[-4:] == ["info", "lfs", "objects", "batch"]:
            repo_type, repo_id = self._split_repo_path(parts[:-4], git=True)
            need_auth()
            with self._lock:
                self._get_repo(repo_type, repo_id, authorized)
            payload = jbody()
            objects = []
            for obj in payload.get("objects", []):
                oid, size = obj["oid"], int(obj["size"])
                entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if oid not in self.lfs_objects:
                    entry["actions"] = {
                        "upload": {"href": f"{self.endpoint}/lfs-upload/{oid}/{size}", "header": {}},
                        "verify": {"href": f"{self.endpoint}/lfs-verify/{oid}/{size}", "header": {}},
                    }
                objects.append(entry)
            return h.send_json(
                200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json"
            )

        # ---- file download: /{prefix}{ns}/{name}/resolve/{revision}/{path}
        if method in ("GET", "HEAD") and "resolve" in parts:
            idx = parts.index("resolve")
            if idx in (2, 3) and len(parts) >= idx + 3:
                repo_type, repo_id = self._split_repo_path(parts[:idx])
                revision, filename = parts[idx + 1], "/".join(parts[idx + 2 :])
                with self._lock:
                    repo = self._get_repo(repo_type, repo_id, authorized)
                    sha = self._resolve(repo, revision)
                    stored = repo.commits[sha].files.get(filename)
                if stored is None:
                    raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
                headers = {"X-Repo-Commit": sha, "ETag": f'"{stored.etag}"', "Accept-Ranges": "bytes"}
                if stored.lfs:
                    headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(stored.size)})
                content, status = stored.content, 200
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", ""))
                if match and method == "GET":
                    start = int(match[1])
                    end = int(match[2]) if match[2] else len(content) - 1
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                    content, status = content[start : end + 1], 206
                return h.send_bytes(status, content, headers, content_type="application/octet-stream")

        raise HubError(404, f"Unhandled route {method} {raw_path}", headers={"X-Unhandled": "1"})

    @staticmethod
    def _split_repo_path(parts: list[str], git: bool = False) -> tuple[str, str]:
        """``[prefix,] ns, name`` -> (repo_type, repo_id); ``name`` may end with ``.git``."""
        repo_type = "model"
        if len(parts) == 3 and parts[0] in _PLURAL_TO_TYPE and parts[0] != "models":
            repo_type, parts = _PLURAL_TO_TYPE[parts[0]], parts[1:]
        if len(parts) != 2:
            raise _repo_not_found()
        name = parts[1][:-4] if git and parts[1].endswith(".git") else parts[1]
        return repo_type, f"{parts[0]}/{name}"


class _Handler(BaseHTTPRequestHandler):
    """Reads the body, records the request, routes it to the HubServer, formats errors like the Hub."""

    protocol_version = "HTTP/1.1"
    server_version = "HubTestServer/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence the default stderr logging."""

    def setup(self) -> None:
        """Track the connection so that ``HubServer.stop`` can close it."""
        super().setup()
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        with hub._lock:
            hub._connections.add(self.connection)

    def finish(self) -> None:
        """Forget the connection."""
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        with hub._lock:
            hub._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_bytes(
        self,
        status: int,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        content_type: str = "text/plain",
    ) -> None:
        """Send a full response (headers only for HEAD, with the body's length)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(
        self,
        status: int,
        data: Any,
        extra: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Send a JSON response."""
        self.send_bytes(status, json.dumps(data).encode(), extra, content_type=content_type)

    def _dispatch(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        body = self._read_body()
        split = urlsplit(self.path)
        record = RecordedRequest(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            authorized=bool(self.headers.get("Authorization")),
        )
        with hub._lock:
            hub.requests.append(record)
        try:
            hub._handle(self, self.command, split.path, record.query, body)
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            if headers.pop("X-Unhandled", None):
                with hub._lock:
                    hub.unhandled.append(record)
            self.send_json(err.status, {"error": err.message}, headers)
        except Exception as err:  # pragma: no cover - surfaced to the client as a 500
            self.send_json(500, {"error": f"{type(err).__name__}: {err}"}, {"X-Error-Message": str(err)[:200]})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch


# ---------------------------------------------------------------------- pointing clients at the server
def point_hub_at(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make an already-imported huggingface_hub (and timm, transformers, datasets) use ``endpoint``.

    huggingface_hub copies ``HF_ENDPOINT`` into ``constants.ENDPOINT``/``HUGGINGFACE_CO_URL_TEMPLATE`` at
    import and builds a module-level ``HfApi`` (whose bound methods are ``huggingface_hub.model_info``,
    ``upload_folder``, ...) with that endpoint; transformers caches its own ``HfApi`` in
    ``transformers.utils.hub._hf_api``. All of them are patched here (undone by ``monkeypatch``), together
    with the offline mode, Xet and telemetry switches.
    """
    endpoint = endpoint.rstrip("/")
    host = urlsplit(endpoint).hostname or "127.0.0.1"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")

    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {host}))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    if hasattr(_http, "_HUB_ORIGINS"):
        monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)}))
    git_credential = sys.modules.get("huggingface_hub.utils._git_credential")
    if git_credential is not None and hasattr(git_credential, "ENDPOINT"):
        monkeypatch.setattr(git_credential, "ENDPOINT", endpoint)
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)  # rebuilt lazily with the patched endpoint
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        monkeypatch.setattr(datasets_config, "HF_ENDPOINT", endpoint, raising=False)
        monkeypatch.setattr(
            datasets_config,
            "HUB_DATASETS_URL",
            endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
            raising=False,
        )
        monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False, raising=False)
        monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", False, raising=False)


def isolate_hf_home(hf_home: str | Path, monkeypatch: pytest.MonkeyPatch, token: str = DUMMY_TOKEN) -> None:
    """Point ``HF_HOME``/``HF_HUB_CACHE`` (env and huggingface_hub constants) at ``hf_home``; dummy token."""
    home = Path(hf_home)
    hub_cache = home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)

    from huggingface_hub import constants

    values = {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_XET_CACHE": str(home / "xet"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for name, value in values.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)


@pytest.fixture
def hub_server(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A fresh :class:`HubServer` for one test, with huggingface_hub/timm/transformers pointed at it.

    Sets ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET=1``, ``HF_TOKEN`` (dummy), ``HF_HUB_OFFLINE=0`` and an isolated
    ``HF_HOME``/``HF_HUB_CACHE`` (a temp dir), in the environment and in the already-imported modules.
    """
    with HubServer() as server:
        isolate_hf_home(tmp_path_factory.mktemp("hf_home"), monkeypatch)
        point_hub_at(server.endpoint, monkeypatch)
        yield server
        transformers_hub = sys.modules.get("transformers.utils.hub")
        cached = getattr(transformers_hub, "_hf_api", None)
        if cached is not None and getattr(cached, "endpoint", None) == server.endpoint:
            transformers_hub._hf_api = None  # type: ignore[union-attr]


def _main() -> None:  # pragma: no cover - manual use: python tests/hub_server.py
    """Serve until interrupted (prints the endpoint)."""
    with HubServer() as server:
        print(f"HF_ENDPOINT={server.endpoint}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":  # pragma: no cover
    _main()
