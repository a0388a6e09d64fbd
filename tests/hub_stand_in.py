"""A local stand-in of the Hugging Face Hub, for testing loading by repo id and `push_to_hub` offline.

It answers, on 127.0.0.1 only, the requests that `huggingface_hub` makes for `model_info`/`repo_info`,
`list_repo_tree`,
`hf_hub_download` and `snapshot_download` (HEAD and GET of `/{repo}/resolve/{revision}/{path}`), and for `create_repo`
and `upload_folder` (`/api/repos/create`, `/api/validate-yaml`, `preupload`, `commit`). Every file is uploaded as a
regular (non-LFS) blob, which the real Hub also accepts. Repos live in memory; every commit gets a new sha.

Point a process at it with `HF_ENDPOINT=stand_in.url` (read by `huggingface_hub` when it is imported, so set it in a
fresh process) and `HF_HUB_OFFLINE=0`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def _git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubStandIn:
    """`with HubStandIn() as hub:` serves until the block ends; `hub.add_folder(repo_id, path)` publishes a folder."""

    def __init__(self, request_timeout: float = 30.0):
        self.repos: dict[str, list[tuple[str, dict[str, bytes]]]] = {}  # repo id -> commits (sha, files), oldest first
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            timeout = request_timeout  # a client that stalls cannot hold a server thread for longer

            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                stand_in._handle(self, "HEAD")

            def do_GET(self):
                stand_in._handle(self, "GET")

            def do_POST(self):
                stand_in._handle(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ repo state

    def commit(self, repo_id: str, files: dict[str, bytes], replace: bool = False) -> str:
        """Add a commit to `repo_id` (created if needed) that adds or overwrites `files`; returns its sha."""
        with self._lock:
            commits = self.repos.setdefault(repo_id, [])
            tree = {} if replace or not commits else dict(commits[-1][1])
            tree.update(files)
            digest = hashlib.sha1(repo_id.encode())
            for path in sorted(tree):
                digest.update(path.encode() + b"\0" + _git_blob_sha(tree[path]).encode())
            digest.update(str(len(commits)).encode())
            sha = digest.hexdigest()
            commits.append((sha, tree))
            return sha

    def add_folder(self, repo_id: str, folder: str | Path) -> str:
        """Publish every file under `folder` as one commit of `repo_id`; returns its sha."""
        root = Path(folder)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        return self.commit(repo_id, files, replace=True)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return self._resolve(repo_id, revision)[1]

    def _resolve(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        with self._lock:
            commits = self.repos.get(repo_id)
            if not commits:
                return None
            if revision in ("main", "", None):
                return commits[-1]
            return next((c for c in commits if c[0] == revision), None)

    # ------------------------------------------------------------------ HTTP

    def _handle(self, request: BaseHTTPRequestHandler, method: str):
        path = unquote(urlsplit(request.path).path)
        self.requests.append((method, path))
        body = b""
        if method == "POST":
            body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        try:
            status, headers, payload = self._route(method, path, body)
        except Exception as error:  # a bug in the stand-in must show as a failed request, not a hang
            status, headers, payload = 500, {}, json.dumps({"error": repr(error)}).encode()
        request.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        headers["Content-Length"] = str(len(payload))
        for key, value in headers.items():
            request.send_header(key, value)
        request.end_headers()
        if method != "HEAD":
            request.wfile.write(payload)

    @staticmethod
    def _json(value, status: int = 200, **headers):
        return status, dict(headers), json.dumps(value).encode()

    def _not_found(self, what: str, code: str = "RepoNotFound"):
        return self._json({"error": f"{what} not found"}, 404, **{"X-Error-Code": code, "X-Error-Message": what})

    def _route(self, method: str, path: str, body: bytes):
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/repos/create":
            request = json.loads(body)
            repo_id = (
                f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            )
            if "/" not in repo_id:
                repo_id = f"stand-in-user/{repo_id}"
            if repo_id not in self.repos:
                self.repos[repo_id] = []
                self.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            return self._json({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})
        if method == "POST" and path == "/api/validate-yaml":
            return self._json({"warnings": []})
        if method == "GET" and path == "/api/whoami-v2":
            return self._json({"type": "user", "name": "stand-in-user", "auth": {"accessToken": {"role": "write"}}})

        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            return self._api_models(method, repo_id, rest, body)

        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            resolved = self._resolve(repo_id, revision)
            if resolved is None:
                return self._not_found(f"Repository {repo_id}@{revision}")
            sha, files = resolved
            if filename not in files:
                return self._not_found(f"Entry {filename}", "EntryNotFound")
            content = files[filename]
            etag = f'"{_git_blob_sha(content)}"'
            return 200, {"X-Repo-Commit": sha, "ETag": etag, "Content-Type": "application/octet-stream"}, content
        return self._not_found(path, "EntryNotFound")

    def _api_models(self, method: str, repo_id: str, rest: list[str], body: bytes):
        if method == "GET" and (not rest or rest[0] == "revision"):
            resolved = self._resolve(repo_id, rest[1] if len(rest) > 1 else "main")
            if resolved is None:
                return self._not_found(f"Repository {repo_id}")
            sha, files = resolved
            siblings = [{"rfilename": name, "size": len(content)} for name, content in sorted(files.items())]
            return self._json(
                {"id": repo_id, "modelId": repo_id, "sha": sha, "siblings": siblings, "private": False, "tags": []}
            )
        if method == "GET" and rest and rest[0] == "tree":
            resolved = self._resolve(repo_id, rest[1] if len(rest) > 1 else "main")
            if resolved is None:
                return self._not_found(f"Repository {repo_id}")
            prefix = "/".join(rest[2:])
            entries = [
                {"type": "file", "path": name, "size": len(content), "oid": _git_blob_sha(content)}
                for name, content in sorted(resolved[1].items())
                if not prefix or name.startswith(prefix + "/")
            ]
            return self._json(entries)
        if method == "POST" and rest and rest[0] == "preupload":
            if repo_id not in self.repos:
                return self._not_found(f"Repository {repo_id}")
            files = json.loads(body)["files"]
            return self._json(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if method == "POST" and rest and rest[0] == "commit":
            if repo_id not in self.repos:
                return self._not_found(f"Repository {repo_id}")
            added = {}
            for line in body.decode().splitlines():
                entry = json.loads(line) if line.strip() else None
                if entry and entry["key"] == "file":
                    value = entry["value"]
                    content = value["content"]
                    added[value["path"]] = (
                        base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    )
                elif entry and entry["key"] not in ("header", "file"):
                    raise ValueError(f"the stand-in only takes regular files, got a {entry['key']!r} entry")
            sha = self.commit(repo_id, added)
            return self._json({"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True})
        return self._not_found("/".join(["api/models", repo_id, *rest]), "EntryNotFound")
