"""A loopback stand-in for the Hugging Face Hub: the endpoints huggingface_hub's push and pull use, on 127.0.0.1.

Files are committed inline (every upload is answered "regular", so no LFS or Xet); each commit gets
a sha, and downloads carry the headers the client checks (X-Repo-Commit, ETag = git blob id).
Private repositories answer 401 without the right bearer token, like the Hub. Written against
huggingface_hub 2.4.0 (pinned in pyproject.toml).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    sha: str = "0" * 40


class FakeHub:
    """`with FakeHub(token) as hub:` serves at hub.endpoint; hub.repos, hub.requests (method, path, had_token)."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, bool]] = []
        self.bodies: list[bytes] = []  # every request body, to grep for the token
        self.tampered: dict[tuple[str, str], bytes] = {}  # (repo, path) -> bytes served instead of the file
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def commit(self, repo: Repo, files: dict[str, bytes]) -> str:
        repo.files.update(files)
        state = json.dumps({k: blob_id(v) for k, v in sorted(repo.files.items())} | {"parent": repo.sha})
        repo.sha = hashlib.sha1(state.encode()).hexdigest()
        return repo.sha


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(/revision/(?P<rev>[^/]+))?$"), "info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(/(?P<path>.*))?$"), "tree"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _dispatch(self, method: str) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            authorized = self.headers.get("Authorization") == f"Bearer {hub.token}"
            hub.requests.append((method, path, authorized))
            length = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(length) if length else b""
            hub.bodies.append(self.body)
            self.query = parse_qs(url.query)
            for verb, pattern, name in _ROUTES:
                match = pattern.match(path)
                if verb == method and match:
                    args = {k: v for k, v in match.groupdict().items() if v is not None}
                    if "repo" in args and name != "create":
                        repo = hub.repos.get(args["repo"])
                        if repo is None or (repo.private and not authorized):
                            return self._send(401 if not authorized else 404, {"error": "Repository not found"},
                                              {"X-Error-Code": "RepoNotFound"})
                        if name in ("preupload", "commit") and not authorized:
                            return self._send(401, {"error": "Invalid credentials"})
                        args["repo"] = (args["repo"], repo)
                    return getattr(self, name)(**args)
            self._send(404, {"error": f"no route {method} {path}"})

        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        def _send(self, status: int, payload=None, headers=None, raw: bytes | None = None) -> None:
            body = raw if raw is not None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def create(self):
            if not any(a for m, p, a in hub.requests[-1:]):
                return self._send(401, {"error": "Invalid credentials"})
            spec = json.loads(self.body)
            repo_id = f"{spec.get('organization') or 'user'}/{spec['name']}"
            if repo_id in hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"})
            hub.repos[repo_id] = Repo(private=bool(spec.get("private")) or spec.get("visibility") == "private")
            self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

        def validate_yaml(self):
            self._send(200, {"errors": [], "warnings": []})

        def preupload(self, repo, rev):
            files = json.loads(self.body)["files"]
            self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files], "commitOid": repo[1].sha})

        def commit(self, repo, rev):
            files = {}
            for line in self.body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] != "header":
                    return self._send(400, {"error": f"the fake Hub takes inline files only, got {item['key']}"})
            sha = hub.commit(repo[1], files)
            self._send(200, {"commitUrl": f"{hub.endpoint}/{repo[0]}/commit/{sha}", "commitOid": sha,
                             "success": True})

        def _revision(self, repo, rev) -> bool:
            if rev not in ("main", repo[1].sha):
                self._send(404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
                return False
            return True

        def info(self, repo, rev="main"):
            if self._revision(repo, rev):
                siblings = [{"rfilename": name, "blobId": blob_id(data), "size": len(data)}
                            for name, data in sorted(repo[1].files.items())]
                self._send(200, {"id": repo[0], "modelId": repo[0], "sha": repo[1].sha, "private": repo[1].private,
                                 "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})

        def tree(self, repo, rev, path=""):
            if self._revision(repo, rev):
                self._send(200, [{"type": "file", "path": name, "oid": blob_id(data), "size": len(data)}
                                 for name, data in sorted(repo[1].files.items()) if name.startswith(path)])

        def resolve(self, repo, rev, path):
            if not self._revision(repo, rev):
                return
            data = hub.tampered.get((repo[0], path), repo[1].files.get(path))
            if data is None:
                return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound",
                                                                       "X-Repo-Commit": repo[1].sha})
            self._send(200, raw=data, headers={"X-Repo-Commit": repo[1].sha, "ETag": f'"{blob_id(data)}"'})

    return Handler
