"""A loopback stand-in for the Hugging Face Hub: the few endpoints `hf_hub_download` / `snapshot_download` call.

Serves files the test puts in `repos` (repo id -> {path in repo: bytes}) on 127.0.0.1 only:
  GET  /api/models/{repo}[/revision/{rev}]            repo info (sha)
  GET  /api/models/{repo}/tree/{rev}[/{path}]         the file list (recursive)
  HEAD /{repo}/resolve/{rev}/{path}                   metadata: ETag, X-Repo-Commit, Content-Length
  GET  /{repo}/resolve/{rev}/{path}                   the bytes, honouring `Range: bytes=N-` (206)
Failure modes, per repo or file, for the error lines: `status[repo] = (code, X-Error-Code or None)` (a 5xx
answer says Retry-After: 0, so the client's retries take seconds);
`drop_once` (paths whose first GET is cut after half the bytes: the client resumes with a Range request);
`short` (paths whose GET sends half the bytes while HEAD announced all: a partial download).
Every request is recorded in `requests` as (method, path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class Hub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.status: dict[str, tuple[int, str | None]] = {}
        self.drop_once: set[str] = set()
        self.short: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    @staticmethod
    def sha(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def _repo(self, parts: list[str]) -> tuple[str | None, list[str]]:
        """Longest 'org/name' prefix that is a served (or failing) repo."""
        repo = "/".join(parts[:2])
        return (repo if repo in self.repos or repo in self.status else None), parts[2:]

    def _handle(self, req, head: bool):
        url = urlparse(req.path)
        self.requests.append((req.command, url.path, req.headers.get("Range")))
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        api = parts[:2] == ["api", "models"]
        repo, rest = self._repo(parts[2:] if api else parts)
        if repo is None:
            return self._send(req, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)
        if repo in self.status:
            code, error_code = self.status[repo]
            headers = {"X-Error-Code": error_code} if error_code else {}
            if code >= 500:
                headers["Retry-After"] = "0"  # the client retries at once (about 1 s apart), not over 25 s
            return self._send(req, code, b"{}", headers, head)
        files, sha = self.repos[repo], self.sha(repo)
        if api and (not rest or rest[0] == "revision"):
            return self._json(req, {"id": repo, "sha": sha, "siblings": [{"rfilename": p} for p in files]}, head)
        if api and rest[0] == "tree":
            prefix = "/".join(rest[2:])
            entries = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                       for p, b in sorted(files.items()) if p.startswith(prefix)]
            return self._json(req, entries, head)
        if rest[:1] != ["resolve"]:
            return self._send(req, 404, b"{}", {}, head)
        path = "/".join(rest[2:])
        if path not in files:
            return self._send(req, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, head)
        data = files[path]
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": sha}
        if head:
            return self._send(req, 200, data, headers, head=True)
        start = int(req.headers["Range"].split("=")[1].split("-")[0]) if req.headers.get("Range") else 0
        body = data[start:]
        if path in self.short:
            body = body[:len(body) // 2]
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if path in self.drop_once and not start:
            self.drop_once.discard(path)
            req.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                req.send_header(k, v)
            req.end_headers()
            req.wfile.write(body[:len(body) // 2])
            req.wfile.flush()
            req.close_connection = True
            return
        return self._send(req, status, body, headers, head=False)

    def _json(self, req, obj, head):
        return self._send(req, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

    @staticmethod
    def _send(req, status, body: bytes, headers: dict, head: bool):
        req.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            req.send_header(k, v)
        req.end_headers()
        if not head:
            req.wfile.write(body)
