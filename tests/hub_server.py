"""A minimal Hugging Face Hub on 127.0.0.1 for testing uploads with the real `huggingface_hub` client.

It implements what `HfApi.whoami`, `create_repo`, `repo_info` and `upload_folder` (without Xet) call, with the
request and response shapes of huggingface_hub 2.x (`hf_api.py`, `_commit_api.py`, `lfs.py`):

* `GET  /api/whoami-v2`
* `POST /api/validate-yaml`                                   (README.md front matter)
* `POST /api/repos/create`                                    (409 when the repository exists)
* `GET  /api/models/{repo_id}[/revision/{rev}]`
* `POST /api/models/{repo_id}/preupload/{rev}`                -> "regular" or "lfs" per file
* `POST /{repo_id}.git/info/lfs/objects/batch`                -> basic transfer: upload + verify actions
* `PUT  /lfs/upload/{oid}` and `POST /lfs/verify`             (the "S3" side; sha256 checked)
* `POST /api/models/{repo_id}/commit/{rev}`                   (NDJSON: header, file, lfsFile, deletedFile)

Every request is recorded (method, path, status) so tests can assert what was, or was not, sent.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".png")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub's limit for regular (git) text files


class FakeHub:
    """State of the fake Hub: valid tokens, repositories and their files, stored LFS objects, request log."""

    def __init__(self, tokens=("hf_valid_test_token",), user="tester"):
        self.tokens = set(tokens)
        self.user = user
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "files": {path: bytes}, "commits": [...]}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------------------------------------------ handler
    def _handler(hub):  # noqa: N805 - `hub` is the FakeHub; `self` is the request handler below
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload=None, headers=None):
                body = b"" if payload is None else json.dumps(payload).encode()
                with hub.lock:
                    hub.requests.append((self.command, self.path, status))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _authorized(self) -> bool:
                header = self.headers.get("Authorization", "")
                if header.startswith("Bearer ") and header[len("Bearer ") :] in hub.tokens:
                    return True
                self._send(401, {"error": "Invalid credentials in Authorization header"})
                return False

            def do_GET(self):
                self._body()
                if self.path == "/api/whoami-v2":
                    if self._authorized():
                        self._send(200, {"type": "user", "name": hub.user, "auth": {"type": "access_token"}})
                    return
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/?]+)?(?:\?.*)?", self.path)
                if match:
                    if not self._authorized():
                        return
                    repo = hub.repos.get(match[1])
                    if repo is None:
                        self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                        return
                    sha = repo["commits"][-1] if repo["commits"] else "0" * 40
                    siblings = [{"rfilename": path} for path in sorted(repo["files"])]
                    self._send(200, {"id": match[1], "sha": sha, "private": repo["private"], "siblings": siblings})
                    return
                self._send(404, {"error": f"Unknown route GET {self.path}"})

            def do_PUT(self):
                body = self._body()
                match = re.fullmatch(r"/lfs/upload/([0-9a-f]{64})", self.path)
                if not match:
                    self._send(404, {"error": f"Unknown route PUT {self.path}"})
                elif hashlib.sha256(body).hexdigest() != match[1]:
                    self._send(400, {"error": "sha256 mismatch"})
                else:
                    with hub.lock:
                        hub.lfs_objects[match[1]] = body
                    self._send(200)

            def do_POST(self):
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/lfs/verify":
                    data = json.loads(body)
                    stored = hub.lfs_objects.get(data["oid"])
                    self._send(200 if stored is not None and len(stored) == data["size"] else 404, {})
                    return
                if not self._authorized():
                    return
                if path == "/api/validate-yaml":
                    self._validate_yaml(json.loads(body)["content"])
                elif path == "/api/repos/create":
                    self._create_repo(json.loads(body))
                elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
                    self._preupload(match[1], json.loads(body))
                elif match := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
                    self._lfs_batch(match[1], json.loads(body))
                elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
                    self._commit(match[1], body)
                else:
                    self._send(404, {"error": f"Unknown route POST {path}"})

            def _validate_yaml(self, content: str):
                match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
                try:
                    metadata = yaml.safe_load(match[1]) if match else {}
                except yaml.YAMLError as err:
                    self._send(400, {"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []})
                    return
                if not isinstance(metadata, dict):
                    self._send(400, {"errors": [{"message": "Metadata must be a mapping"}], "warnings": []})
                    return
                self._send(200, {"errors": [], "warnings": []})

            def _create_repo(self, payload: dict):
                repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
                url = f"{hub.url}/{repo_id}"
                with hub.lock:
                    if repo_id in hub.repos:
                        self._send(409, {"error": "You already created this model repo", "url": url})
                        return
                    private = payload.get("visibility") == "private" or payload.get("private") is True
                    hub.repos[repo_id] = {"private": private, "files": {}, "commits": []}
                self._send(200, {"url": url, "name": repo_id})

            def _preupload(self, repo_id: str, payload: dict):
                if repo_id not in hub.repos:
                    self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    return
                files = []
                for file in payload["files"]:
                    sample = base64.b64decode(file["sample"])
                    lfs = file["path"].endswith(LFS_SUFFIXES) or file["size"] >= LFS_MIN_SIZE or b"\0" in sample
                    files.append(
                        {"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                    )
                self._send(200, {"files": files, "commitOid": "0" * 40})

            def _lfs_batch(self, repo_id: str, payload: dict):
                if repo_id not in hub.repos:
                    self._send(404, {"message": "Repository not found"})
                    return
                objects = []
                for obj in payload["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                    if obj["oid"] not in hub.lfs_objects:
                        entry["actions"] = {
                            "upload": {"href": f"{hub.url}/lfs/upload/{obj['oid']}", "header": {}},
                            "verify": {"href": f"{hub.url}/lfs/verify", "header": {}},
                        }
                    objects.append(entry)
                self._send(200, {"transfer": "basic", "objects": objects})

            def _commit(self, repo_id: str, body: bytes):
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    return
                if self.headers.get("Content-Type") != "application/x-ndjson":
                    self._send(400, {"error": "Expected application/x-ndjson"})
                    return
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                if not lines or lines[0]["key"] != "header" or not lines[0]["value"]["summary"]:
                    self._send(400, {"error": "The first line must be the commit header"})
                    return
                changes = {}
                for line in lines[1:]:
                    value = line["value"]
                    if line["key"] == "file":
                        changes[value["path"]] = base64.b64decode(value["content"])
                    elif line["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs_objects:
                            self._send(422, {"error": f"LFS object {value['oid']} was not uploaded"})
                            return
                        changes[value["path"]] = hub.lfs_objects[value["oid"]]
                    elif line["key"] in ("deletedFile", "deletedFolder"):
                        changes[value["path"]] = None
                    else:
                        self._send(400, {"error": f"Unknown commit operation {line['key']!r}"})
                        return
                with hub.lock:
                    for path, content in changes.items():
                        if content is None:
                            repo["files"].pop(path, None)
                        else:
                            repo["files"][path] = content
                    oid = hashlib.sha1(body + str(len(repo["commits"])).encode()).hexdigest()
                    repo["commits"].append(oid)
                    repo.setdefault("messages", []).append(lines[0]["value"]["summary"])
                self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})

        return Handler
