"""Schemathesis against the server and execd, shared by the fuzz test (few examples per operation)
and bench/fuzz_bench.py (many): the configuration, the corrected execd document, the run.

Every check schemathesis has is on (`[checks] enabled = true`): no 5xx, status codes, content types,
response schemas and headers as documented, schema-invalid requests refused, schema-valid ones
accepted, deleted resources gone, `Allow` on 405... with these exceptions, each for a reason a
document cannot capture:

- server, `POST /sandboxes` and `renew-expiration`: a valid create needs an image and an entrypoint
  that exist; a valid renew a date after now. Positive-data acceptance is off for them only.
- server, `/networkpolicy`: a rule's target must be a DNS name, a `*.` wildcard, an IP address or a
  CIDR, which the document's string type cannot say; positive-data acceptance is off there.
- server, `GET /endpoints/{port}?expires=`: the expiry must lie between now and
  `server.maxSignedEndpointSeconds` from now; positive-data acceptance is off there. `/templates`
  answers 501 `API_NOT_SUPPORTED` by design (no templates here): not fuzzed.
- server, `/proxy/...`: the answers are the sandbox's (execd's, port 44772), not the server's; the
  proxy operations fuzz execd through the server. Positive-data acceptance is off for them.
- execd: whether a request is valid depends on the sandbox's files, users and sessions (an owner
  that exists, a file that is there), so positive-data acceptance is off; everything else is on,
  against upstream's document with the corrections of `execd_document`.

The sandbox the server runs is given as `path.sandboxId`; its DELETE is not fuzzed (the run needs
it), everything else is, including creates (the test removes whatever the fuzzer left).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.paths import ROOT

EXECD_UPSTREAM_DOCUMENT = ROOT / "tests" / "fixtures" / "execd-api.yaml"  # upstream's, verbatim
_ERROR = {
    "description": "the request was refused: {code, message}",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}


@dataclass
class FuzzRun:
    returncode: int
    output: str
    generated: int
    passed: int

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, chars: int = 6000) -> str:
        return self.output[-chars:]


def server_config(sandbox_id: str, execd_port: int = 44772) -> str:
    return f"""
max-stream-events = 3

[checks]
enabled = true

[parameters]
"path.sandboxId" = "{sandbox_id}"

[[operations]]
include-operation-id-regex = "^proxy_"
parameters = {{ "path.port" = {execd_port} }}
checks = {{ positive_data_acceptance = {{ enabled = false }} }}

[[operations]]
include-operation-id-regex = "^(create_sandbox|renew_expiration)"
checks = {{ positive_data_acceptance = {{ enabled = false }} }}

[[operations]]
include-path-regex = "(/networkpolicy|/endpoints/[^/]+)$"
checks = {{ positive_data_acceptance = {{ enabled = false }} }}

[[operations]]
include-path-regex = "^/v1/templates"
enabled = false

[[operations]]
include-operation-id-regex = "^delete_sandbox"
enabled = false
"""


EXECD_CONFIG = """
# /metrics/watch streams an event a second for as long as it is read: read a few.
max-stream-events = 3

[checks]
enabled = true
positive_data_acceptance = { enabled = false }

[[operations]]
include-path-regex = "^/(code|pty)"
enabled = false
"""


def execd_document(target: Path) -> Path:
    """Upstream's execd document, corrected to say what execd answers (written to `target`):

    - every operation may answer a 4xx `{code, message}` (upstream lists 400/500 only; execd also
      says 401 without its token, 404 for unknown ids and files, 405, 409, 413, 416, 429);
    - an optional request field may be null, which execd reads as absent (as upstream's Go execd
      decodes null: the SDK never sends it);
    - `/files/replace` without `verbose=true` answers 200 with an empty body (its description says
      so; its schema says JSON);
    - an event stream's schema describes each event's `data` (a JSON document), not the event;
    - a `Permission`'s `mode` may be left out: it has a default (755) in the same document, which
      execd applies (the document also calls it required).
    `/code` and `/pty` are not fuzzed: execd answers 501 there on this branch.
    """
    document: dict[str, Any] = yaml.safe_load(EXECD_UPSTREAM_DOCUMENT.read_text())
    for operations in document["paths"].values():
        for operation in operations.values():
            if isinstance(operation, dict) and "responses" in operation:
                operation["responses"].setdefault("4XX", _ERROR)
                body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
                if "schema" in body:
                    _nullable_optionals(body["schema"], document)
            if isinstance(operation, dict):
                for response in operation.get("responses", {}).values():
                    stream = (
                        response.get("content", {}).get("text/event-stream") if isinstance(response, dict) else None
                    )
                    if stream is not None and "schema" in stream:
                        stream["schema"] = _sse_event(stream["schema"])
    permission = document["components"]["schemas"]["Permission"]
    permission["required"] = [name for name in permission.get("required", []) if name != "mode"]
    replace = document["paths"]["/files/replace"]["post"]["responses"]["200"]
    replace.pop("content", None)
    target.write_text(json.dumps(document, default=str))  # YAML dates in examples
    return target


def _sse_event(data_schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data_schema}
        },
    }


def _nullable_optionals(schema: dict[str, Any], document: dict[str, Any], seen: set[str] | None = None) -> None:
    seen = seen if seen is not None else set()
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        if name in seen:
            return
        seen.add(name)
        schema = document["components"]["schemas"][name]
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        if name not in required and isinstance(prop, dict):
            schema["properties"][name] = {"anyOf": [prop, {"type": "null"}]}


_GENERATED = re.compile(r"(\d+) generated")
_PASSED = re.compile(r"(\d+) generated, (\d+) passed")


def run(
    schema: str | Path,
    config: str,
    workdir: Path,
    *,
    base_url: str | None = None,
    headers: dict[str, str] | None = None,
    max_examples: int = 10,
    seed: int | None = None,
    extra: list[str] | None = None,
    timeout: float = 900,
) -> FuzzRun:
    """`schemathesis run` (the installed CLI) with `config` as its configuration file."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "schemathesis.toml"
    config_path.write_text(config)
    cli = Path(sys.executable).with_name("schemathesis")
    args = [str(cli), "--config-file", str(config_path), "--no-color", "run", str(schema)]
    args += ["--max-examples", str(max_examples), "--workers", "1", "--request-timeout", "30"]
    args += ["--continue-on-failure", "--generation-database", "none", "--report-dir", str(workdir / "report")]
    if base_url:
        args += ["--url", base_url]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    if seed is not None:
        args += ["--seed", str(seed)]
    args += extra or []
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=workdir)
    output = result.stdout + result.stderr
    (workdir / "schemathesis.out").write_text(output)
    generated = int(m.group(1)) if (m := _GENERATED.search(output)) else 0
    passed = int(m.group(2)) if (m := _PASSED.search(output)) else 0
    return FuzzRun(result.returncode, output, generated, passed)
