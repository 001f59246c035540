"""A small Hub-API-compatible server for tests, on the standard library only.

It speaks the part of the Hugging Face Hub API that the real `huggingface_hub` and `transformers` clients use to
create a model repo, commit files to it and download them back: repos are folders under `root`, every commit is
stored on disk (its files as git blobs named by their git SHA-1, its tree and parent in `commits.json`), and the
`resolve` endpoint serves any revision. Files are always uploaded in "regular" mode, so their contents arrive
base64-encoded inside the commit payload and no LFS or Xet transfer is involved. Dataset repos (`repo_type="dataset"`)
are kept apart from model repos and served under the Hub's `/api/datasets/...` and `/datasets/.../resolve/...` routes.

Branches are refs to commits (`refs.json`): `create_branch` / `delete_branch` and commits to a branch work as on the
Hub, and `main` moves only when a commit is made to it.

Switches simulate failures: `fail_with = {"commit": 500}` answers the next commit with HTTP 500 after its preupload
went through (a failure mid-upload); `fail_paths = {r"/commit/main$": 500}` fails the requests whose path matches a
regular expression (e.g. the commit to `main` only, after a commit to a branch went through); `fail_with = {"*": 401}`
refuses everything; `require_token` makes every
request without `Authorization: Bearer <that token>` a 401. `requests` logs method, path and (lower-cased) headers of each
request, so tests can check what the client sent.

Usage:

```python
with HubServer(tmp_path / "hub") as hub:
    HfApi(endpoint=hub.url, token="hf_dummy").create_repo("me/model")
```
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

ALLOWED_RELATIONS = {"adapter", "merge", "quantized", "finetune"}


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of `data`: the `oid` the Hub reports for a regular file."""
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def validate_metadata(content: str) -> list[str]:
    """Errors in the YAML front matter of a README, checked the way the Hub checks model cards."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
    if not match:
        return []
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as err:
        return [f"YAML is not valid: {err}"]
    if not isinstance(meta, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    for key in ("tags", "datasets", "metrics"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            errors.append(f'"{key}" must be a list of strings')
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errors.append('"library_name" must be a string')
    base = meta.get("base_model")
    if base is not None and not (isinstance(base, str) or (isinstance(base, list) and all(isinstance(b, str) for b in base))):
        errors.append('"base_model" must be a string or a list of strings')
    relation = meta.get("base_model_relation")
    if relation is not None:
        if relation not in ALLOWED_RELATIONS:
            errors.append(f'"base_model_relation" must be one of {sorted(ALLOWED_RELATIONS)}, got {relation!r}')
        if base is None:
            errors.append('"base_model_relation" needs "base_model"')
    index = meta.get("model-index")
    if index is not None:
        if not isinstance(index, list):
            errors.append('"model-index" must be a list')
        else:
            for model in index:
                if not isinstance(model, dict) or "name" not in model or not isinstance(model.get("results"), list):
                    errors.append('each "model-index" entry needs "name" and a list of "results"')
                    continue
                for result in model["results"]:
                    task, dataset, metrics = result.get("task"), result.get("dataset"), result.get("metrics")
                    if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                        errors.append('"model-index" result needs "task.type"')
                    if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), str) for k in ("type", "name")):
                        errors.append('"model-index" result needs "dataset.type" and "dataset.name"')
                    if not isinstance(metrics, list) or not metrics:
                        errors.append('"model-index" result needs a non-empty "metrics" list')
                        continue
                    for metric in metrics:
                        if not isinstance(metric.get("type"), str) or "value" not in metric:
                            errors.append('each metric needs "type" and "value"')
    return errors


class _Store:
    """Repos on disk: `<root>/<ns>/<name>/{blobs/<sha1>, commits.json}`."""

    def __init__(self, root: str):
        self.root = root
        self.lock = threading.Lock()
        os.makedirs(root, exist_ok=True)

    def repo_dir(self, repo_id: str) -> str:
        return os.path.join(self.root, *repo_id.split("/"))

    def exists(self, repo_id: str) -> bool:
        return os.path.isfile(os.path.join(self.repo_dir(repo_id), "commits.json"))

    def all_commits(self, repo_id: str) -> list[dict]:
        """Every commit of `repo_id`, on any branch, in the order they were made."""
        with open(os.path.join(self.repo_dir(repo_id), "commits.json")) as f:
            return json.load(f)

    def refs(self, repo_id: str) -> dict[str, str]:
        """`{branch: commit id}`; a repo stored before branches existed has its last commit as `main`."""
        path = os.path.join(self.repo_dir(repo_id), "refs.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        commits = self.all_commits(repo_id)
        return {"main": commits[-1]["id"]} if commits else {}

    def _write_refs(self, repo_id: str, refs: dict[str, str]) -> None:
        path = os.path.join(self.repo_dir(repo_id), "refs.json")
        with open(path + ".tmp", "w") as f:
            json.dump(refs, f, indent=1)
        os.replace(path + ".tmp", path)

    def commits(self, repo_id: str, branch: str = "main") -> list[dict]:
        """The commits reachable from `branch`, oldest first."""
        by_id = {c["id"]: c for c in self.all_commits(repo_id)}
        out, cid = [], self.refs(repo_id).get(branch)
        while cid is not None:
            out.append(by_id[cid])
            cid = by_id[cid]["parent"]
        return out[::-1]

    def create_branch(self, repo_id: str, branch: str, start: str | None) -> str | None:
        """Point a new `branch` at `start` (a revision; default `main`); returns None if it exists already."""
        with self.lock:
            refs = self.refs(repo_id)
            if branch in refs:
                return None
            commit = self.resolve(repo_id, start or "main")
            if commit is None:
                raise KeyError(start)
            refs[branch] = commit["id"]
            self._write_refs(repo_id, refs)
            return commit["id"]

    def delete_branch(self, repo_id: str, branch: str) -> bool:
        with self.lock:
            refs = self.refs(repo_id)
            if branch not in refs or branch == "main":
                return False
            del refs[branch]
            self._write_refs(repo_id, refs)
            return True

    def _write_commits(self, repo_id: str, commits: list[dict]) -> None:
        path = os.path.join(self.repo_dir(repo_id), "commits.json")
        with open(path + ".tmp", "w") as f:
            json.dump(commits, f, indent=1)
        os.replace(path + ".tmp", path)

    def blob(self, repo_id: str, sha: str) -> bytes:
        with open(os.path.join(self.repo_dir(repo_id), "blobs", sha), "rb") as f:
            return f.read()

    def resolve(self, repo_id: str, revision: str) -> dict | None:
        """The commit that `revision` (a branch name, a full or a short commit id) points to."""
        commits = self.all_commits(repo_id)
        refs = self.refs(repo_id)
        revision = "main" if revision == "HEAD" else revision
        if revision in refs:
            return next(c for c in commits if c["id"] == refs[revision])
        for c in commits:
            if len(revision) >= 7 and c["id"].startswith(revision):
                return c
        return None

    def create(self, repo_id: str, private: bool) -> bool:
        with self.lock:
            if self.exists(repo_id):
                return False
            os.makedirs(os.path.join(self.repo_dir(repo_id), "blobs"), exist_ok=True)
            self._write_commits(repo_id, [])
            self._write_refs(repo_id, {})
            self.commit(repo_id, "initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, [], private=private, locked=True)
            return True

    def commit(self, repo_id: str, title: str, added: dict[str, bytes], deleted: list[str], parent: str | None = None,
               private: bool | None = None, locked: bool = False, branch: str = "main") -> dict:
        if not locked:
            self.lock.acquire()
        try:
            commits = self.all_commits(repo_id)
            refs = self.refs(repo_id)
            if commits and branch not in refs:
                raise KeyError(branch)
            head = next(c for c in commits if c["id"] == refs[branch]) if commits else None
            if parent is not None and head is not None and not head["id"].startswith(parent):
                raise ValueError(f"parent commit {parent} is not the head of {branch} ({head['id']})")
            files = dict(head["files"]) if head else {}
            for path in deleted:
                files = {p: s for p, s in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
            for path, data in added.items():
                sha = git_blob_sha1(data)
                blob_path = os.path.join(self.repo_dir(repo_id), "blobs", sha)
                if not os.path.exists(blob_path):
                    with open(blob_path + ".tmp", "wb") as f:
                        f.write(data)
                    os.replace(blob_path + ".tmp", blob_path)
                files[path] = {"oid": sha, "size": len(data)}
            seed = json.dumps([head["id"] if head else None, title, files, time.time_ns()]).encode()
            commit = {
                "id": hashlib.sha1(seed).hexdigest(),
                "parent": head["id"] if head else None,
                "title": title,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                "files": files,
                "private": head["private"] if head and private is None else bool(private),
            }
            commits.append(commit)
            self._write_commits(repo_id, commits)
            refs[branch] = commit["id"]
            self._write_refs(repo_id, refs)
            return commit
        finally:
            if not locked:
                self.lock.release()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubServer"

    # --- plumbing ---------------------------------------------------------------------------------------------

    def log_message(self, format, *args):  # keep pytest output clean; requests are recorded instead
        pass

    def _body(self) -> bytes:
        # Read the whole body on every request: the handler object is reused across keep-alive requests.
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body=b"", headers: dict | None = None, head_only: bool = False):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None, head_only: bool = False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers, head_only=head_only)

    def _dispatch(self, method: str):
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        srv = self.server
        srv.requests.append({"method": method, "path": path, "headers": {k.lower(): v for k, v in self.headers.items()}})
        head_only = method == "HEAD"
        for key in (path.rsplit("/", 2)[-2] if path.count("/") >= 2 else "", "*"):
            status = srv.fail_with.get(key) if key else None
            if status:
                if srv.fail_once:
                    srv.fail_with.pop(key)
                return self._error(status, "Simulated failure" if status != 401 else "Invalid credentials in Authorization header", head_only=head_only)
        for pattern, status in list(srv.fail_paths.items()):
            if re.search(pattern, path):
                if srv.fail_once:
                    srv.fail_paths.pop(pattern)
                return self._error(status, "Simulated failure", head_only=head_only)
        # Like the Hub, metadata validation is open to anonymous calls (`ModelCard.validate` sends no token).
        if srv.require_token is not None and path != "/api/validate-yaml" and self.headers.get("Authorization") != f"Bearer {srv.require_token}":
            return self._error(401, "Invalid credentials in Authorization header", head_only=head_only)
        try:
            return self._route(method, path, query, body, head_only)
        except Exception as err:  # a bug in the server must reach the test as a 500, not a hang
            return self._error(500, f"{type(err).__name__}: {err}")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # --- routes -----------------------------------------------------------------------------------------------

    def _route(self, method, path, query, body, head_only):
        store = self.server.store
        # Dataset repos live in their own store and are served under the same routes with `datasets/` in the path
        # (`/api/datasets/<repo>/...`, `/datasets/<repo>/resolve/...`), as on the Hub.
        dataset_path = re.fullmatch(r"/(api/)?datasets/(.+)", path)
        if dataset_path:
            store = self.server.dataset_store
            path = ("/api/models/" if dataset_path.group(1) else "/") + dataset_path.group(2)
        if method in ("POST", "DELETE") and path in ("/api/repos/create", "/api/repos/delete"):
            if json.loads(body or b"{}").get("type", "model") == "dataset":
                store = self.server.dataset_store
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body or b"{}")
            if payload.get("type", "model") not in ("model", "dataset"):
                return self._error(400, "this test server only hosts model and dataset repos")
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else f"user/{payload['name']}"
            private = payload.get("private") or payload.get("visibility") == "private"
            if not store.create(repo_id, bool(private)):
                return self._send(409, {"error": "You already created this model repo", "url": f"{self.server.url}/{repo_id}"})
            return self._send(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id, "id": repo_id})
        if method == "DELETE" and path == "/api/repos/delete":
            payload = json.loads(body or b"{}")
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if not store.exists(repo_id):
                return self._error(404, "Repository not found", "RepoNotFound")
            import shutil

            shutil.rmtree(store.repo_dir(repo_id))
            return self._send(200, {})
        if method == "POST" and path == "/api/validate-yaml":
            payload = json.loads(body or b"{}")
            errors = validate_metadata(payload.get("content", ""))
            if errors:
                return self._send(400, {"errors": [{"message": e} for e in errors], "warnings": []})
            return self._send(200, {"errors": [], "warnings": []})

        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(preupload|commit|revision|tree|commits|refs|branch)(?:/([^/]+))?(?:/(.*))?)?", path)
        if m:
            repo_id, action, rev, rest = m.groups()
            if not store.exists(repo_id):
                return self._error(404, f"Repository not found: {repo_id}", "RepoNotFound", head_only)
            if action == "branch" and method == "POST":
                try:
                    made = store.create_branch(repo_id, rev, json.loads(body or b"{}").get("startingPoint"))
                except KeyError:
                    return self._error(404, "Invalid rev id", "RevisionNotFound")
                if made is None:
                    return self._error(409, f"Branch {rev} already exists")
                return self._send(200, {})
            if action == "branch" and method == "DELETE":
                if not store.delete_branch(repo_id, rev):
                    return self._error(404 if rev != "main" else 403, f"Cannot delete branch {rev}")
                return self._send(200, {})
            rev = rev or "main"
            if action == "preupload" and method == "POST":
                base = store.resolve(repo_id, rev)
                if base is None:
                    return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                head = base["files"]
                files = json.loads(body)["files"]
                return self._send(200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": head[f["path"]]["oid"] if f["path"] in head else None}
                    for f in files
                ]})
            if action == "commit" and method == "POST":
                return self._commit(repo_id, rev, body, store)
            commit = store.resolve(repo_id, rev)
            if commit is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound", head_only)
            if action in (None, "revision"):
                return self._send(200, {
                    "id": repo_id, "modelId": repo_id, "sha": commit["id"], "private": commit["private"],
                    "lastModified": commit["date"], "tags": [], "downloads": 0, "likes": 0,
                    "siblings": [{"rfilename": p, "size": f["size"]} for p, f in sorted(commit["files"].items())],
                }, head_only=head_only)
            if action == "tree":
                return self._send(200, self._tree(commit, rest or "", query.get("recursive", ["false"])[0] in ("1", "true", "True")))
            if action == "commits":
                out, c = [], commit
                by_id = {x["id"]: x for x in store.all_commits(repo_id)}
                while c is not None:
                    out.append({"id": c["id"], "title": c["title"], "message": "", "date": c["date"], "authors": [{"user": "user"}]})
                    c = by_id.get(c["parent"])
                return self._send(200, out)
            if action == "refs":
                return self._send(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                                                     for b, c in sorted(store.refs(repo_id).items())],
                                        "tags": [], "converts": []})

        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            repo_id, rev, file_path = m.groups()
            if not store.exists(repo_id):
                return self._error(404, "Repository not found", "RepoNotFound", head_only)
            commit = store.resolve(repo_id, rev)
            if commit is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound", head_only)
            entry = commit["files"].get(file_path)
            if entry is None:
                return self._error(404, f"Entry not found: {file_path}", "EntryNotFound", head_only)
            data = store.blob(repo_id, entry["oid"])
            return self._send(200, data, {"ETag": f'"{entry["oid"]}"', "X-Repo-Commit": commit["id"],
                                          "Content-Type": "application/octet-stream"}, head_only=head_only)
        return self._error(404, f"No route for {method} {path}")

    def _tree(self, commit: dict, prefix: str, recursive: bool) -> list[dict]:
        prefix = prefix.strip("/")
        out, dirs = [], set()
        for p, f in sorted(commit["files"].items()):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rel = p[len(prefix) + 1:] if prefix else p
            parts = rel.split("/")
            for i in range(1, len(parts)):
                if not recursive and i > 1:
                    break
                d = "/".join(([prefix] if prefix else []) + parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    out.append({"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0})
            if recursive or len(parts) == 1:
                out.append({"type": "file", "path": p, "size": f["size"], "oid": f["oid"]})
        return out

    def _commit(self, repo_id: str, rev: str, body: bytes, store=None):
        store = store or self.server.store
        if rev not in store.refs(repo_id):
            return self._error(404, f"Invalid rev id: {rev} is not a branch", "RevisionNotFound")
        header, added, deleted = {}, {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    return self._error(400, f"unsupported encoding {value.get('encoding')}")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return self._error(400, f"this test server accepts regular files only, got {key!r}")
        if "README.md" in added:
            errors = validate_metadata(added["README.md"].decode())
            if errors:
                return self._error(400, "Invalid metadata in README.md: " + "; ".join(errors))
        try:
            commit = store.commit(repo_id, header.get("summary", ""), added, deleted, parent=header.get("parentCommit"),
                                  branch=rev)
        except ValueError as err:
            return self._error(412, str(err))
        return self._send(200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{commit['id']}", "commitOid": commit["id"],
                                "pullRequestUrl": None})


class HubServer(ThreadingHTTPServer):
    """
    The test Hub, listening on 127.0.0.1 on a free port, served from a daemon thread.

    Args:
        root (`str`): folder where repos and their commits are stored.
        require_token (`str`, *optional*): when set, requests must carry `Authorization: Bearer <require_token>`.

    Attributes:
        url (`str`): the endpoint to give the client (`HfApi(endpoint=hub.url)`).
        fail_with (`dict[str, int]`): `{route key: HTTP status}` to fail requests with; the key is the path segment
            before the last one (`"commit"`, `"preupload"`, `"repos"` for create, ...) or `"*"` for every request.
        fail_paths (`dict[str, int]`): `{regular expression: HTTP status}`: fail the requests whose path matches.
        fail_once (`bool`): drop a `fail_with` or `fail_paths` entry after it fired once.
        requests (`list[dict]`): method, path and headers of every request received.
    """

    daemon_threads = True

    def __init__(self, root, require_token: str | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.store = _Store(str(root))
        self.dataset_store = _Store(os.path.join(str(root), "_datasets"))
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.require_token = require_token
        self.fail_with: dict[str, int] = {}
        self.fail_paths: dict[str, int] = {}
        self.fail_once = False
        self.requests: list[dict] = []
        self._thread = None

    def commits(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> list[dict]:
        """Commits of `repo_id` on `branch` (default main), oldest first (the first is the repo's initial commit)."""
        return (self.dataset_store if repo_type == "dataset" else self.store).commits(repo_id, branch)

    def branches(self, repo_id: str) -> dict[str, str]:
        """`{branch: commit id}` of `repo_id`."""
        return self.store.refs(repo_id)

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
