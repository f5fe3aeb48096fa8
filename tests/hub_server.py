"""A Hugging Face hub on the loopback, serving local directories, for the tests of the download paths.

The test machines reach no hub, yet the paths a user's run takes through ``huggingface_hub``,
transformers, datasets and lm-eval (``teacher.path: org/model``, ``data.source: hub``, a harness task
whose dataset is on the hub) must be exercised for real. ``HF_ENDPOINT=<server.url>`` sends those
libraries here instead of huggingface.co.

Why ours: the packages on the registries that speak the hub's protocol (olah, hf-mirror) are proxies
of an upstream hub or serve git mirrors; none serves a directory written by ``save_pretrained``.
This one serves exactly what the libraries read, and nothing else:

- ``GET /api/{models,datasets}/ORG/NAME[/revision/REV]``: the repository's info (commit, files);
- ``GET /api/{models,datasets}/ORG/NAME/tree/REV[/PATH]``: a folder's listing (``recursive`` honoured);
- ``POST /api/{models,datasets}/ORG/NAME/paths-info/REV``: the entries named by ``paths``;
- ``HEAD|GET [/datasets]/ORG/NAME/resolve/REV/PATH``: a file, with the commit and etag headers the
  libraries check;
- ``HEAD|GET /api/models``: the listing the product's reachability probe asks for (empty).

Repositories are folders added with ``add_model`` / ``add_dataset``; each has one revision (any
name the client asks for resolves to it), whose commit is a hash of the files' contents. A missing
repository or file answers 404 with the ``X-Error-Code`` the hub sends, so the libraries raise
their usual errors. Requests are recorded in ``requests`` ("METHOD path") for the tests to assert
that a download really went through the server.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import shutil
import threading
import urllib.parse
from pathlib import Path
from typing import Any

_API = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(/.*)?)?$")
_RESOLVE = re.compile(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class _Repository:
    """One served repository: its folder and the commit that names its contents."""

    def __init__(self, root: Path) -> None:
        self.root = root
        digest = hashlib.sha1()
        for path in self.files():
            digest.update(path.encode())
            digest.update(hashlib.sha256((root / path).read_bytes()).digest())
        self.commit = digest.hexdigest()

    def files(self) -> list[str]:
        """Relative paths of every file, sorted."""
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def entry(self, path: str) -> dict[str, Any] | None:
        """The tree entry of ``path`` (file or folder), or None when it does not exist."""
        target = self.root / path
        if target.is_file():
            data = target.read_bytes()
            return {
                "type": "file",
                "path": path,
                "size": len(data),
                "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
            }
        if target.is_dir():
            return {"type": "directory", "path": path, "oid": self.commit}
        return None


class HubServer:
    """A loopback hub over local folders; ``url`` is what ``HF_ENDPOINT`` should be."""

    def __init__(self, storage: Path) -> None:
        self.storage = storage
        self.repositories: dict[tuple[str, str], _Repository] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:  # noqa: N802 (the stdlib's name)
                server._answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                server._answer(self, body=True)

            def do_POST(self) -> None:  # noqa: N802
                server._answer(self, body=True)

            def log_message(self, *args: Any) -> None:
                return None

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()

    def add_model(self, repo_id: str, folder: Path) -> None:
        """Serve ``folder`` (e.g. written by ``save_pretrained``) as the model ``repo_id``."""
        self._add("models", repo_id, folder)

    def add_dataset(self, repo_id: str, folder: Path) -> None:
        """Serve ``folder`` (data files, optionally a README.md with a ``configs:`` header) as the
        dataset ``repo_id``."""
        self._add("datasets", repo_id, folder)

    def _add(self, kind: str, repo_id: str, folder: Path) -> None:
        copy = self.storage / kind / repo_id
        shutil.copytree(folder, copy, dirs_exist_ok=True)
        self.repositories[(kind, repo_id)] = _Repository(copy)

    def _answer(self, handler: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        url = urllib.parse.urlsplit(handler.path)
        path = urllib.parse.unquote(url.path)
        query = urllib.parse.parse_qs(url.query)
        self.requests.append(f"{handler.command} {path}")
        if path == "/api/models" or path == "/api/datasets":
            return self._send(handler, 200, b"[]", body, content_type="application/json")
        if match := _RESOLVE.match(path):
            kind = "datasets" if match.group(1) else "models"
            return self._file(handler, kind, match.group(2), match.group(4), body)
        if match := _API.match(path):
            kind, repo_id, action, _revision, rest = match.groups()
            repository = self.repositories.get((kind, repo_id))
            if repository is None:
                return self._error(handler, 404, "RepoNotFound", body)
            if action is None or action == "revision":
                return self._json(handler, self._info(kind, repo_id, repository), body)
            if action == "tree":
                return self._tree(handler, repository, (rest or "").strip("/"), query, body)
            return self._paths_info(handler, repository, body)
        return self._error(handler, 404, "RepoNotFound", body)

    def _info(self, kind: str, repo_id: str, repository: _Repository) -> dict[str, Any]:
        files = repository.files()
        return {
            "_id": repository.commit[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": repository.commit,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": [
                {"rfilename": name, "size": (repository.root / name).stat().st_size} for name in files
            ],
            **({"cardData": {}} if kind == "datasets" else {}),
        }

    def _tree(
        self,
        handler: http.server.BaseHTTPRequestHandler,
        repository: _Repository,
        folder: str,
        query: dict[str, list[str]],
        body: bool,
    ) -> None:
        base = repository.root / folder
        if not base.is_dir():
            return self._error(handler, 404, "EntryNotFound", body)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        children = sorted(base.rglob("*") if recursive else base.iterdir())
        entries = [repository.entry(str(child.relative_to(repository.root))) for child in children]
        self._json(handler, [entry for entry in entries if entry is not None], body)

    def _paths_info(
        self, handler: http.server.BaseHTTPRequestHandler, repository: _Repository, body: bool
    ) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length).decode() if length else ""
        if handler.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(raw or "{}").get("paths", [])
        else:
            paths = urllib.parse.parse_qs(raw).get("paths", [])
        paths = paths if isinstance(paths, list) else [paths]
        entries = [repository.entry(path.strip("/")) for path in paths]
        self._json(handler, [entry for entry in entries if entry is not None], body)

    def _file(
        self, handler: http.server.BaseHTTPRequestHandler, kind: str, repo_id: str, path: str, body: bool
    ) -> None:
        repository = self.repositories.get((kind, repo_id))
        if repository is None:
            return self._error(handler, 404, "RepoNotFound", body)
        target = repository.root / path
        if not target.is_file():
            return self._error(handler, 404, "EntryNotFound", body, commit=repository.commit)
        data = target.read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": repository.commit, "ETag": f'"{etag}"'}
        self._send(handler, 200, data, body, content_type="application/octet-stream", headers=headers)

    def _json(self, handler: http.server.BaseHTTPRequestHandler, payload: Any, body: bool) -> None:
        self._send(handler, 200, json.dumps(payload).encode(), body, content_type="application/json")

    def _error(
        self,
        handler: http.server.BaseHTTPRequestHandler,
        status: int,
        code: str,
        body: bool,
        commit: str | None = None,
    ) -> None:
        headers = {"X-Error-Code": code, **({"X-Repo-Commit": commit} if commit else {})}
        payload = json.dumps({"error": code}).encode()
        self._send(handler, status, payload, body, content_type="application/json", headers=headers)

    @staticmethod
    def _send(
        handler: http.server.BaseHTTPRequestHandler,
        status: int,
        data: bytes,
        body: bool,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)
