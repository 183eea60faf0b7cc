"""A minimal, in-memory, Hub-compatible HTTP server for tests (stdlib only, loopback only).

It answers the calls that unmodified ``huggingface_hub`` 2.4 clients make for ``create_repo``, ``upload_folder`` /
``create_commit`` (preupload + NDJSON commit with inline base64 files), ``push_to_hub`` (``validate-yaml``),
``hf_hub_download`` / ``snapshot_download`` (HEAD/GET ``resolve``, revision info, tree listing) and ``whoami``.
Point a client at it with ``HF_ENDPOINT=server.url`` set *before* ``huggingface_hub`` is imported.

Example:
    >>> with HubServer(token="hf_dummy") as hub:  # doctest: +SKIP
    ...     print(hub.url)  # http://127.0.0.1:<free port>
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API = re.compile(rf"^/api/(?P<type>models|datasets|spaces)/{_REPO}(?P<rest>/.*)?$")
_RESOLVE = re.compile(rf"^/(?:(?P<type>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_sha(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub reports as a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """One repository: its files at the head of ``main`` and its commit ids (newest last)."""

    type: str
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)

    def at(self, rev: str) -> Optional[str]:
        """The commit id for ``rev`` (``main`` or a known commit id), else None."""
        if rev == "main" and self.commits:
            return self.commits[-1]
        return rev if rev in self.commits else None


class HubServer:
    """Serves in-memory repos on ``127.0.0.1:<free port>``; records every ``Authorization`` header it receives.

    ``token``: when set, writes (create, preupload, commit) without ``Authorization: Bearer <token>`` get 401.
    ``vanishing``: (repo id, path) pairs that listings show but downloads answer 404 for (a server that changes its
    answers between a client's check and its download).
    """

    def __init__(self, token: Optional[str] = None, user: str = "user") -> None:
        self.token, self.user = token, user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.auth_headers: list[str] = []
        self.requests: list[str] = []
        self.vanishing: set[tuple[str, str]] = set()
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The endpoint to put in ``HF_ENDPOINT``."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        """A copy of the files at the head of ``main``."""
        with self.lock:
            return dict(self.repos[(repo_type, repo_id)].files)

    def commit(self, repo: Repo, lines: list[dict[str, Any]]) -> str:
        """Apply NDJSON commit operations to ``repo``; return the new commit id."""
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise ValueError(f"unsupported encoding {value.get('encoding')!r}")
                repo.files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                repo.files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in repo.files if p.startswith(prefix)]:
                    del repo.files[path]
            elif key != "header":  # lfsFile etc.: preupload never asks for LFS
                raise ValueError(f"unsupported commit operation {key!r}")
        state = json.dumps({p: git_blob_sha(d) for p, d in sorted(repo.files.items())}).encode()
        sha = hashlib.sha1(state + str(len(repo.commits)).encode()).hexdigest()
        repo.commits.append(sha)
        return sha


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        # ----- plumbing -----
        def _send(self, status: int, body: Any = b"", headers: Optional[dict[str, str]] = None) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            if not isinstance(body, bytes):
                self.send_header("Content-Type", "application/json")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, code: str, message: str) -> None:
            self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _authorized(self) -> bool:
            if hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return False

        def _route(self) -> None:
            auth = self.headers.get("Authorization")
            with hub.lock:
                if auth is not None:
                    hub.auth_headers.append(auth)
                hub.requests.append(f"{self.command} {self.path}")
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            try:
                with hub.lock:
                    self._dispatch(path, query)
            except Exception as e:  # a bug in a request or here: answer 400, never hang the client
                self._error(400, "BadRequest", f"{type(e).__name__}: {e}")

        do_GET = do_HEAD = do_POST = _route

        # ----- endpoints -----
        def _dispatch(self, path: str, query: dict[str, list[str]]) -> None:
            post = self.command == "POST"
            if post and path == "/api/repos/create":
                return self._create_repo(json.loads(self._body() or b"{}"))
            if post and path == "/api/validate-yaml":
                self._body()
                return self._send(200, {"errors": [], "warnings": []})
            if path == "/api/whoami-v2":
                return self._send(200, {"type": "user", "name": hub.user, "orgs": []}) if self._authorized() else None
            if m := _API.match(path):
                return self._api(_TYPES[m["type"]], m["repo"], m["rest"] or "", query)
            if m := _RESOLVE.match(path):
                return self._resolve(_TYPES.get(m["type"] or "models", "model"), m["repo"], m["rev"], m["path"])
            self._error(404, "NotFound", f"no route for {self.command} {path}")

        def _create_repo(self, payload: dict[str, Any]) -> None:
            if not self._authorized():
                return
            repo_type = payload.get("type") or "model"
            repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
            url = f"{hub.url}/{_PREFIX[repo_type]}{repo_id}"
            if (repo_type, repo_id) in hub.repos:
                return self._send(409, {"error": "You already created this repo", "url": url})
            repo = hub.repos[(repo_type, repo_id)] = Repo(repo_type)
            hub.commit(repo, [{"key": "file", "value": {"path": ".gitattributes", "content": ""}}])
            self._send(200, {"url": url, "name": repo_id})

        def _repo(self, repo_type: str, repo_id: str, rev: str) -> Optional[tuple[Repo, str]]:
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            sha = repo.at(rev)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return None
            return repo, sha

        def _api(self, repo_type: str, repo_id: str, rest: str, query: dict[str, list[str]]) -> None:
            parts = rest.strip("/").split("/", 2) if rest else []
            action, rev, sub = (parts + ["", "", ""])[:3]
            if self.command == "POST" and action in ("preupload", "commit"):
                if not self._authorized() or (found := self._repo(repo_type, repo_id, rev or "main")) is None:
                    return
                repo, _ = found
                body = self._body()
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                         "oid": git_blob_sha(repo.files[f["path"]]) if f["path"] in repo.files else None}
                        for f in files
                    ]})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                sha = hub.commit(repo, lines)
                return self._send(200, {"commitOid": sha, "commitUrl": f"{hub.url}/{_PREFIX[repo_type]}{repo_id}/commit/{sha}",
                                        "pullRequestUrl": None})
            if self.command != "GET" or action not in ("", "revision", "tree"):
                return self._error(404, "NotFound", f"no route for {self.command} {rest}")
            if (found := self._repo(repo_type, repo_id, rev or "main")) is None:
                return
            repo, sha = found
            if action == "tree":
                return self._send(200, self._tree(repo, sub.strip("/"), query.get("recursive", ["false"])[0] == "true"))
            self._send(200, {"id": repo_id, "sha": sha, "private": False, "tags": [],
                             "siblings": [{"rfilename": p} for p in sorted(repo.files)]})

        def _tree(self, repo: Repo, folder: str, recursive: bool) -> list[dict[str, Any]]:
            prefix = folder + "/" if folder else ""
            entries: dict[str, dict[str, Any]] = {}
            for p, data in sorted(repo.files.items()):
                if not p.startswith(prefix):
                    continue
                parts = p[len(prefix):].split("/")
                for i in range(1, len(parts) if recursive else min(len(parts), 1)):
                    d = prefix + "/".join(parts[:i])
                    entries.setdefault(d, {"type": "directory", "path": d, "oid": git_blob_sha(d.encode())})
                if recursive or len(parts) == 1:
                    entries[p] = {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha(data)}
                else:
                    d = prefix + parts[0]
                    entries.setdefault(d, {"type": "directory", "path": d, "oid": git_blob_sha(d.encode())})
            return list(entries.values())

        def _resolve(self, repo_type: str, repo_id: str, rev: str, path: str) -> None:
            if self.command not in ("GET", "HEAD") or (found := self._repo(repo_type, repo_id, rev)) is None:
                return None if self.command in ("GET", "HEAD") else self._error(405, "NotAllowed", "GET/HEAD only")
            repo, sha = found
            if path not in repo.files or (repo_id, path) in hub.vanishing:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
            data, status = repo.files[path], 200
            headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"', "Accept-Ranges": "bytes"}
            rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if rng and self.command == "GET":
                start = int(rng[1])
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                data, status = data[start:], 206
            self._send(status, data, headers)

    return Handler
