"""A small but real FHIR R4 server for push tests (http.server in a thread).

It implements what Carina's push relies on, the way R4 specifies it
(http.html#transaction, #cond-update, #ccreate), so "re-sending creates
nothing new" is checked against real conditional semantics, not assumed:

- POST [base] with a transaction Bundle, validated with fhir.resources R4B
  (400 + OperationOutcome when invalid);
- POST entries with ifNoneExist: 0 matches create, 1 match is a no-op (200),
  2+ matches fail the transaction (412);
- PUT Type?identifier=system|value: 1 match updates (new version), 0 creates,
  2+ fail (412); PUT Type/id updates or creates with that id;
- urn:uuid fullUrls referenced inside the Bundle are rewritten to the ids
  assigned or matched; the response is a transaction-response Bundle.

Test switches: `token` (Bearer) or `basic` ((user, password)) authentication;
`outage` answers the next N transactions 500 without committing;
`commit_then_fail` commits the next N transactions and then answers 500 (the
"did it arrive?" case that makes naive senders duplicate); `reject` answers
every transaction with that 4xx status and an OperationOutcome.
"""
from __future__ import annotations

import base64
import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from peers import free_port


def outcome(code: str, text: str) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


class FhirTestServer:
    def __init__(self, *, token: str | None = None, basic: tuple[str, str] | None = None):
        self.token, self.basic = token, basic
        self.port = free_port()
        self.store: dict[tuple[str, str], dict] = {}
        self.bundles: list[dict] = []  # every transaction Bundle received, as sent
        self.responses: list[tuple[int, dict]] = []  # (HTTP status, body) per transaction
        self.outage = 0
        self.commit_then_fail = 0
        self.reject: tuple[int, str] | None = None
        self.lock = threading.Lock()
        self._next_id = 1
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> "FhirTestServer":
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status, answer = peer.handle(urlsplit(self.path).path, self.headers, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # --- queries for the tests ----------------------------------------------------------

    def of_type(self, rtype: str) -> list[dict]:
        return [r for (t, _), r in sorted(self.store.items()) if t == rtype]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rtype, _ in self.store:
            out[rtype] = out.get(rtype, 0) + 1
        return out

    # --- the server ----------------------------------------------------------------------

    def _authorized(self, headers) -> bool:
        given = headers.get("Authorization", "")
        if self.token is not None:
            return given == f"Bearer {self.token}"
        if self.basic is not None:
            expected = base64.b64encode(f"{self.basic[0]}:{self.basic[1]}".encode()).decode()
            return given == f"Basic {expected}"
        return True

    def handle(self, path: str, headers, body: bytes) -> tuple[int, dict]:
        with self.lock:
            status, answer = self._handle(path, headers, body)
            self.responses.append((status, answer))
            return status, answer

    def _handle(self, path: str, headers, body: bytes) -> tuple[int, dict]:
        if path.rstrip("/") != "/fhir":
            return 404, outcome("not-found", f"{path} is not this server's base")
        if not self._authorized(headers):
            return 401, outcome("login", "authentication required")
        try:
            bundle = json.loads(body)
        except ValueError:
            return 400, outcome("structure", "body is not JSON")
        self.bundles.append(copy.deepcopy(bundle))
        if self.outage:
            self.outage -= 1
            return 500, outcome("transient", "simulated outage: nothing was stored")
        if self.reject is not None:
            status, text = self.reject
            return status, outcome("business-rule", text)
        try:
            Bundle.model_validate(bundle)
        except ValidationError as exc:
            return 400, outcome("structure", f"invalid Bundle: {exc}")
        if bundle.get("type") != "transaction":
            return 400, outcome("invalid", "expected a transaction Bundle")
        snapshot = copy.deepcopy(self.store)
        try:
            response = self._transaction(bundle)
        except _Fail as fail:
            self.store = snapshot  # a transaction is all or nothing
            return fail.status, outcome(fail.code, fail.text)
        if self.commit_then_fail:
            self.commit_then_fail -= 1
            return 500, outcome("exception", "simulated failure after commit")
        return 200, response

    def _match(self, rtype: str, query: str) -> list[tuple[str, str]]:
        params = parse_qs(query)
        if set(params) != {"identifier"}:
            raise _Fail(400, "not-supported", f"only identifier=system|value is supported, got {query!r}")
        system, _, value = params["identifier"][0].partition("|")
        return [
            key for key, resource in self.store.items()
            if key[0] == rtype and any(
                i.get("system") == system and i.get("value") == value for i in resource.get("identifier", [])
            )
        ]

    def _new_id(self) -> str:
        self._next_id += 1
        return str(self._next_id - 1)

    def _transaction(self, bundle: dict) -> dict:
        entries = bundle.get("entry", [])
        resolved: dict[str, str] = {}  # fullUrl -> Type/id
        results: list[dict | None] = [None] * len(entries)
        writes: list[tuple[int, str, str, dict, str]] = []  # (index, type, id, resource, status)
        # R4 transaction order: POST before PUT.
        order = sorted(range(len(entries)), key=lambda i: {"POST": 0, "PUT": 1}.get(entries[i]["request"]["method"], 2))
        for i in order:
            entry = entries[i]
            request, resource = entry["request"], entry["resource"]
            method, url = request["method"], request["url"]
            rtype = resource["resourceType"]
            if method == "POST":
                matches = self._match(rtype, request["ifNoneExist"]) if request.get("ifNoneExist") else []
                if len(matches) > 1:
                    raise _Fail(412, "duplicate", f"ifNoneExist {request['ifNoneExist']} matched {len(matches)}")
                if matches:
                    rid = matches[0][1]
                    results[i] = {"status": "200 OK", "location": f"{rtype}/{rid}"}
                else:
                    rid = self._new_id()
                    writes.append((i, rtype, rid, resource, "201 Created"))
            elif method == "PUT":
                target, _, query = url.partition("?")
                if query:
                    matches = self._match(target, query)
                    if len(matches) > 1:
                        raise _Fail(412, "duplicate", f"conditional update {url} matched {len(matches)}")
                    if "id" in resource and matches and resource["id"] != matches[0][1]:
                        raise _Fail(400, "invalid", f"resource id {resource['id']} does not match {matches[0][1]}")
                    rid = matches[0][1] if matches else self._new_id()
                    status = "200 OK" if matches else "201 Created"
                else:
                    _, _, rid = target.partition("/")
                    status = "200 OK" if (rtype, rid) in self.store else "201 Created"
                writes.append((i, rtype, rid, resource, status))
            else:
                raise _Fail(400, "not-supported", f"method {method} is not supported here")
            resolved[entry["fullUrl"]] = f"{rtype}/{rid}"
        for i, rtype, rid, resource, status in writes:
            body = _rewrite(copy.deepcopy(resource), resolved)
            previous = self.store.get((rtype, rid))
            version = int(previous["meta"]["versionId"]) + 1 if previous else 1
            body["id"] = rid
            body.setdefault("meta", {})
            body["meta"]["versionId"] = str(version)
            self.store[(rtype, rid)] = body
            results[i] = {"status": status, "location": f"{rtype}/{rid}/_history/{version}"}
        for reference in _references(self.store.values()):
            if reference.startswith("urn:uuid:"):
                raise _Fail(400, "invalid", f"unresolved reference {reference}")
        return {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [{"response": r} for r in results],
        }


class _Fail(Exception):
    def __init__(self, status: int, code: str, text: str):
        super().__init__(text)
        self.status, self.code, self.text = status, code, text


def _rewrite(node, resolved: dict[str, str]):
    if isinstance(node, dict):
        return {k: (resolved.get(v, v) if k == "reference" and isinstance(v, str) else _rewrite(v, resolved))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite(v, resolved) for v in node]
    return node


def _references(nodes) -> list[str]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "reference" and isinstance(v, str):
                    found.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(list(nodes))
    return found
