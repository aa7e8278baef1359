"""An in-process Kubernetes API server for tests: the real paths and semantics the client uses.

In: HTTP requests from the official ``kubernetes`` client (and calls from the test: ``put``,
``delete``, ``compact``, ``break_watches``, ``stop``/``start``). Out: JSON as the API server
sends it. Only the subset egressgw uses is served:

- list (``limit``/``continue``, ``labelSelector``, ``fieldSelector``) with
  ``metadata.resourceVersion``; items of core lists carry no kind/apiVersion, as for real. Field
  selectors take ``=``, ``==`` and ``!=`` on metadata.name and metadata.namespace, and on the
  fields of ``FIELD_SELECTORS`` (a Pod's spec.nodeName, as the kubelet and egressgw's agent
  select a node's pods); any other field is refused with 400, as the API server refuses a field
  it does not index;
- watch (``?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=T``) streaming
  newline-delimited ``{"type": ..., "object": ...}`` over chunked HTTP/1.1; a resourceVersion
  older than the retained history gets an ERROR event carrying a Status with code 410;
  BOOKMARK events carry only kind, apiVersion and metadata.resourceVersion. With a selector, an
  object that starts to match is ADDED and one that stops matching is DELETED (carrying its last
  matching state), as the API server's watch cache does;
- the status subresource: PATCH ``application/merge-patch+json`` on ``.../status`` changes only
  ``status`` (and never ``metadata.generation``), which custom resources bump on spec changes;
- Leases: GET, list, POST (409 AlreadyExists) and PUT, whose ``metadata.resourceVersion`` must
  match the stored one (409 Conflict otherwise).

It keeps everything in memory, one global resourceVersion counter like etcd's revision, and
counts requests per (method, path) so tests can assert what was written. Nothing here touches
the network beyond the listening socket the test asks for (127.0.0.1).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    plural: str
    kind: str
    api_version: str
    namespaced: bool

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"

    @property
    def custom(self) -> bool:
        return self.api_version.startswith("egressgw.io/")


RESOURCES = {
    r.plural: r
    for r in (
        Resource("namespaces", "Namespace", "v1", False),
        Resource("pods", "Pod", "v1", True),
        Resource("nodes", "Node", "v1", False),
        Resource("egressgateways", "EgressGateway", "egressgw.io/v1alpha1", False),
        Resource("egresspolicies", "EgressPolicy", "egressgw.io/v1alpha1", True),
        Resource("leases", "Lease", "coordination.k8s.io/v1", True),
    )
}
KIND_TO_PLURAL = {r.kind: r.plural for r in RESOURCES.values()}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: mappings merge, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors: ``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``, comma = and."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


# plural -> the fields a fieldSelector may name besides metadata.name and metadata.namespace
FIELD_SELECTORS: dict[str, tuple[str, ...]] = {
    "pods": ("spec.nodeName",),
}


def _field_value(obj: Obj, path: str) -> str:
    """A field as the API server compares it: a string, empty when the field is absent."""
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def _fields_match(plural: str, selector: str, obj: Obj) -> bool:
    allowed = ("metadata.name", "metadata.namespace", *FIELD_SELECTORS.get(plural, ()))
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            wanted = False
        else:
            key, _, value = term.replace("==", "=").partition("=")
            wanted = True
        if key not in allowed:
            raise ApiError(400, "BadRequest", f'field label not supported: "{key}"')
        if (_field_value(obj, key) == value) != wanted:
            return False
    return True


@dataclass
class Event:
    rv: int
    plural: str
    type: str
    obj: Obj
    prev: Obj | None  # the object before this change (a deletion: the deleted object)


class Store:
    """Objects, their history of changes, and the watchers waiting on it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 1
        self.objects: dict[str, dict[tuple[str, str], Obj]] = {p: {} for p in RESOURCES}
        self.events: list[Event] = []
        self.oldest_rv = 1  # a watch from below this is answered 410 Gone
        self.history_limit = 10_000

    def _record(self, plural: str, type_: str, obj: Obj, prev: Obj | None) -> None:
        self.events.append(Event(self.rv, plural, type_, copy.deepcopy(obj), prev))
        if len(self.events) > self.history_limit:
            dropped = self.events[: len(self.events) - self.history_limit]
            del self.events[: len(dropped)]
            self.oldest_rv = dropped[-1].rv
        self.cond.notify_all()

    def _bump(self, obj: Obj) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def put(self, obj: Obj, *, expect_rv: str | None = None, create_only: bool = False) -> Obj:
        """Create or replace (PUT semantics); keeps status unless ``obj`` is new."""
        plural = KIND_TO_PLURAL[obj["kind"]]
        res = RESOURCES[plural]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        ns = meta.get("namespace", "") if res.namespaced else ""
        if res.namespaced and not ns:
            meta["namespace"] = ns = "default"
        key = (ns, meta["name"])
        with self.cond:
            old = self.objects[plural].get(key)
            if old is None:
                if expect_rv is not None:
                    raise ApiError(404, "NotFound", f'{plural} "{meta["name"]}" not found')
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = _now()
                meta["generation"] = 1
                type_ = "ADDED"
            else:
                if create_only:
                    raise ApiError(
                        409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists'
                    )
                if expect_rv and expect_rv != old["metadata"]["resourceVersion"]:
                    raise ApiError(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on {plural} "{meta["name"]}": the object'
                        " has been modified; please apply your changes to the latest version"
                        " and try again",
                    )
                for field in ("uid", "creationTimestamp"):
                    meta[field] = old["metadata"][field]
                generation = old["metadata"].get("generation", 1)
                if obj.get("spec") != old.get("spec"):
                    generation += 1
                meta["generation"] = generation
                if res.custom:
                    obj["status"] = copy.deepcopy(old.get("status", {}))
                type_ = "MODIFIED"
            obj["apiVersion"], obj["kind"] = res.api_version, res.kind
            self._bump(obj)
            self.objects[plural][key] = obj
            self._record(plural, type_, obj, old)
            return copy.deepcopy(obj)

    def delete(self, plural: str, namespace: str, name: str) -> Obj:
        with self.cond:
            obj = self.objects[plural].pop((namespace, name), None)
            if obj is None:
                raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
            self._bump(obj)
            self._record(plural, "DELETED", obj, obj)
            return copy.deepcopy(obj)

    def patch_status(self, plural: str, namespace: str, name: str, patch: Obj) -> Obj:
        with self.cond:
            old = self.objects[plural].get((namespace, name))
            if old is None:
                raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
            if set(patch) - {"status", "metadata", "apiVersion", "kind"}:
                raise ApiError(400, "BadRequest", "only status may be patched on /status")
            obj = copy.deepcopy(old)
            obj["status"] = merge_patch(obj.get("status", {}), patch.get("status", {}))
            self._bump(obj)
            self.objects[plural][(namespace, name)] = obj
            self._record(plural, "MODIFIED", obj, old)
            return copy.deepcopy(obj)

    def get(self, plural: str, namespace: str, name: str) -> Obj:
        with self.cond:
            obj = self.objects[plural].get((namespace, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
            return copy.deepcopy(obj)

    def select(self, plural: str, namespace: str | None, query: dict[str, str]) -> list[Obj]:
        found = []
        for (ns, _), obj in sorted(self.objects[plural].items()):
            if namespace and ns != namespace:
                continue
            if not _selector_matches(
                query.get("labelSelector", ""), obj["metadata"].get("labels") or {}
            ):
                continue
            if not _fields_match(plural, query.get("fieldSelector", ""), obj):
                continue
            found.append(obj)
        return found


class FakeApiServer:
    """The server. ``url`` is what a kubeconfig's ``server:`` points at."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, bookmark_interval_s: float = 1.0):
        self.store = Store()
        self.host, self.port = host, port
        self.bookmark_interval_s = bookmark_interval_s
        self.requests: Counter[tuple[str, str]] = Counter()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._generation = 0  # bumped by break_watches/stop: streams of older ones end

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Listen (again, on the same port after ``stop``); the stored state is kept."""
        server = self

        class Handler(_Handler):
            api = server

        httpd = _Server((self.host, self.port), Handler)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="fake-apiserver")
        self._thread.start()

    def stop(self) -> None:
        """Go away: stop listening and cut every open connection (an outage)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd = None
        self.break_watches()
        with self._lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeApiServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- what tests do ------------------------------------------------------------------------
    def put(self, obj: Obj) -> Obj:
        """Create or replace an object, as ``kubectl apply`` would (status is kept)."""
        return self.store.put(obj)

    def delete(self, kind: str, name: str, namespace: str = "") -> Obj:
        return self.store.delete(KIND_TO_PLURAL[kind], namespace, name)

    def get(self, kind: str, name: str, namespace: str = "") -> Obj:
        return self.store.get(KIND_TO_PLURAL[kind], namespace, name)

    def list(self, kind: str) -> list[Obj]:
        with self.store.cond:
            return [copy.deepcopy(o) for o in self.store.select(KIND_TO_PLURAL[kind], None, {})]

    def compact(self) -> None:
        """Forget the history: every watch resumed from an older resourceVersion gets 410."""
        with self.store.cond:
            self.store.events.clear()
            self.store.rv += 1
            self.store.oldest_rv = self.store.rv

    def break_watches(self) -> None:
        """End every open watch stream (as a load balancer or an API server restart does)."""
        with self.store.cond:
            self._generation += 1
            self.store.cond.notify_all()

    def count(self, method: str, path_contains: str) -> int:
        return sum(n for (m, p), n in self.requests.items() if m == method and path_contains in p)

    # -- internals ----------------------------------------------------------------------------
    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        return None  # clients that go away mid-request are normal here (outages, kill -9)


def _parse_path(path: str) -> tuple[Resource, str | None, str | None, str | None]:
    """(resource, namespace, name, subresource) of an API path."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        rest = parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        rest = parts[3:]
        group_version = f"{parts[1]}/{parts[2]}"
    else:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
    namespace = None
    if len(rest) >= 2 and rest[0] == "namespaces" and rest[1] and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    if not rest or rest[0] not in RESOURCES:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
    res = RESOURCES[rest[0]]
    expected = "/api/v1" if parts[0] == "api" else f"/apis/{group_version}"
    if res.prefix != expected:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    return res, namespace, name, sub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes: with Nagle, the body waits for the client's
    # delayed ACK (about 40 ms a request on a kept-alive connection)
    disable_nagle_algorithm = True
    api: FakeApiServer

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def setup(self) -> None:
        super().setup()
        self.api._track(self.connection, True)

    def finish(self) -> None:
        self.api._track(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()

    # -- plumbing -----------------------------------------------------------------------------
    def _send(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Obj:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "BadRequest", "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body is not an object")
        return body

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.api.requests[(method, url.path)] += 1
        try:
            res, ns, name, sub = _parse_path(url.path)
            if method == "GET" and name is None and query.get("watch") in ("true", "1"):
                self._watch(res, ns, query)
            elif method == "GET" and name is None:
                self._send(200, self._list(res, ns, query))
            elif method == "GET" and name is not None and sub is None:
                self._send(200, self.api.store.get(res.plural, ns or "", name))
            elif method == "PATCH" and sub == "status" and name is not None:
                kind = self.headers.get("Content-Type", "").split(";")[0]
                if kind != "application/merge-patch+json":
                    raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {kind}")
                self._send(
                    200, self.api.store.patch_status(res.plural, ns or "", name, self._body())
                )
            elif method == "POST" and name is None and res.plural == "leases":
                body = self._body()
                body.setdefault("metadata", {})["namespace"] = ns
                body["kind"] = res.kind
                self._send(201, self.api.store.put(body, create_only=True))
            elif method == "PUT" and name is not None and sub is None and res.plural == "leases":
                body = self._body()
                meta = body.setdefault("metadata", {})
                if meta.get("name") != name:
                    raise ApiError(400, "BadRequest", "the name in the body does not match")
                meta["namespace"] = ns
                body["kind"] = res.kind
                self._send(200, self.api.store.put(body, expect_rv=meta.get("resourceVersion", "")))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
        except ApiError as exc:
            self._send(exc.code, exc.status())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    # -- list and watch -----------------------------------------------------------------------
    def _list(self, res: Resource, ns: str | None, query: dict[str, str]) -> Obj:
        store = self.api.store
        token = query.get("continue")
        with store.cond:
            if token:
                state = json.loads(base64.b64decode(token))
                rv, start = state["rv"], state["start"]
                items = [o for o in state["items"]][start:]
            else:
                rv, start = store.rv, 0
                items = [copy.deepcopy(o) for o in store.select(res.plural, ns, query)]
                if not res.custom:
                    for item in items:
                        item.pop("kind", None)
                        item.pop("apiVersion", None)
        limit = int(query.get("limit") or 0)
        metadata: Obj = {"resourceVersion": str(rv)}
        if limit and len(items) > limit:
            rest = {"rv": rv, "start": start + limit, "items": items}
            if token:
                rest["items"] = json.loads(base64.b64decode(token))["items"]
            metadata["continue"] = base64.b64encode(json.dumps(rest).encode()).decode()
            items = items[:limit]
        return {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version,
            "metadata": metadata,
            "items": items,
        }

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, type_: str, obj: Obj) -> None:
        self._chunk(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

    def _watch(self, res: Resource, ns: str | None, query: dict[str, str]) -> None:
        api, store = self.api, self.api.store
        timeout = float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        requested = query.get("resourceVersion", "")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + timeout
        with store.cond:
            generation = api._generation
            if requested in ("", "0"):
                initial = [copy.deepcopy(o) for o in store.select(res.plural, ns, query)]
                since = store.rv
            else:
                since = int(requested)
                initial = []
                if since < store.oldest_rv or since > store.rv:
                    gone = ApiError(
                        410, "Expired", f"too old resource version: {since} ({store.oldest_rv})"
                    )
                    self._event("ERROR", gone.status())
                    self._chunk(b"")
                    return
        try:
            for obj in initial:
                self._event("ADDED", obj)
            next_bookmark = time.monotonic() + self.api.bookmark_interval_s
            while True:
                with store.cond:
                    pending = self._pending(since, res, ns, query)
                    if not pending:
                        wait = min(deadline, next_bookmark) - time.monotonic()
                        if wait > 0 and api._generation == generation:
                            store.cond.wait(wait)
                        pending = self._pending(since, res, ns, query)
                    current = store.rv
                    broken = api._generation != generation
                if broken:  # cut without the final chunk, as a dropped connection is
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                for rv, type_, obj in pending:
                    self._event(type_, obj)
                    since = rv
                now = time.monotonic()
                if bookmarks and now >= next_bookmark:
                    since = max(since, current)
                    meta = {"resourceVersion": str(since)}
                    self._event(
                        "BOOKMARK",
                        {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta},
                    )
                    next_bookmark = now + self.api.bookmark_interval_s
                if now >= deadline:
                    self._chunk(b"")
                    return
        except (BrokenPipeError, ConnectionResetError, OSError):
            return

    def _pending(
        self, since: int, res: Resource, ns: str | None, query: dict[str, str]
    ) -> list[tuple[int, str, Obj]]:
        """(resourceVersion, type, object) of each event after ``since`` this watch sends."""
        found = []
        for event in self.api.store.events:
            if event.rv > since and event.plural == res.plural:
                converted = _as_seen(event, ns, query)
                if converted is not None:
                    found.append((event.rv, *converted))
        return found


def _matches(obj: Obj | None, plural: str, ns: str | None, query: dict[str, str]) -> bool:
    if obj is None:
        return False
    meta = obj.get("metadata", {})
    if ns and meta.get("namespace") != ns:
        return False
    if not _selector_matches(query.get("labelSelector", ""), meta.get("labels") or {}):
        return False
    return _fields_match(plural, query.get("fieldSelector", ""), obj)


def _as_seen(event: Event, ns: str | None, query: dict[str, str]) -> tuple[str, Obj] | None:
    """The event as a watch with these selectors gets it, or None: an object that starts to
    match is ADDED, one that stops matching is DELETED in its last matching state."""
    now = event.type != "DELETED" and _matches(event.obj, event.plural, ns, query)
    before = _matches(event.prev, event.plural, ns, query)
    if now:
        return ("MODIFIED" if before else "ADDED"), event.obj
    if not before:
        return None
    assert event.prev is not None  # it matched
    last = copy.deepcopy(event.prev)
    last["metadata"]["resourceVersion"] = str(event.rv)
    return "DELETED", last


def kubeconfig(server_url: str) -> str:
    """A kubeconfig (YAML is a superset of JSON) that points the client at ``server_url``."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": server_url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
    )


def iter_events(lines: Iterator[bytes]) -> Iterator[Obj]:
    """Decode a watch stream's lines (for tests reading a stream by hand)."""
    for line in lines:
        if line.strip():
            yield json.loads(line)
