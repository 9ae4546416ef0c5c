"""Terraform of deploy/, read without Terraform: python-hcl2 parses it and a small evaluator resolves the subset of
expressions deploy/ uses (references, coalesce/merge/tostring/upper, jsondecode(file(names.json)),
base64encode(jsonencode(...)), object literals, templates). Anything outside that subset fails loudly, so a reader
cannot pass by not looking.

Two readings: `Evaluator` leaves attributes Terraform knows only after apply as `Ref("type.name.attr")` (the static
checks of tests/test_deploy.py compare references); `Deployed` gives them the values a deployment would have
(service account emails, bucket and job names, custom role ids), so the local stack can enforce what deploy/ grants.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import hcl2

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"

class Ref(str):
    """An attribute Terraform knows only after apply, e.g. google_service_account.jobs.email."""


class Unsupported(Exception):
    pass


def _clean(node: Any) -> Any:
    if isinstance(node, dict):
        return {_unquote(k): _clean(v) for k, v in node.items() if k != "__is_block__"}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def _unquote(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == '"' else key


def load_tf(texts: dict[str, str]) -> dict[str, Any]:
    """{file name: HCL text} -> {"resource": {type: {name: body}}, "data": ..., "locals": {}, "variable": {}}."""
    options = hcl2.SerializationOptions(strip_string_quotes=True, with_comments=False)
    out: dict[str, Any] = {"resource": {}, "data": {}, "locals": {}, "variable": {}, "output": {}}
    for name, text in sorted(texts.items()):
        doc = _clean(hcl2.loads(text, serialization_options=options))
        for block in doc.get("locals", []):
            out["locals"].update(block)
        for kind in ("variable", "output"):
            for block in doc.get(kind, []):
                out[kind].update(block)
        for kind in ("resource", "data"):
            for block in doc.get(kind, []):
                for rtype, named in block.items():
                    for rname, body in named.items():
                        if rname in out[kind].setdefault(rtype, {}):
                            raise AssertionError(f"{kind} {rtype}.{rname} declared twice ({name})")
                        out[kind][rtype][rname] = body
    return out


def deploy_texts(deploy: Path = DEPLOY) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(deploy.glob("*.tf"))}


# ---------------------------------------------------------------------------------------------- expression evaluator

_TOKEN = re.compile(
    r"\s*(?:(?P<num>-?\d+(?:\.\d+)?)|(?P<id>[A-Za-z_][A-Za-z0-9_-]*)|(?P<str>\")|(?P<op>[()\[\],.{}=:*]))"
)


class Evaluator:
    def __init__(self, tf: dict[str, Any], variables: dict[str, Any] | None = None, deploy: Path = DEPLOY) -> None:
        self.tf = tf
        self.deploy = deploy
        self.vars = {name: body.get("default") for name, body in tf["variable"].items()}
        for name, value in (variables or {}).items():
            if name not in self.vars:
                raise AssertionError(f"no variable {name!r} in deploy/variables.tf")
            self.vars[name] = value
        self._locals: dict[str, Any] = {}

    # values as python-hcl2 gives them: "${expr}", "text ${expr} text", plain strings, numbers, dicts, lists
    def value(self, node: Any) -> Any:
        if isinstance(node, str):
            return self.template(node)
        if isinstance(node, dict):
            return {k: self.value(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self.value(v) for v in node]
        return node

    def template(self, text: str) -> Any:
        parts: list[Any] = []
        i = 0
        while i < len(text):
            start = text.find("${", i)
            if start < 0:
                parts.append(text[i:])
                break
            parts.append(text[i:start])
            end = _matching_brace(text, start + 1)
            parts.append(self.expr(text[start + 2 : end]))
            i = end + 1
        parts = [p for p in parts if p != ""]
        if len(parts) == 1 and not (isinstance(parts[0], str) and not isinstance(parts[0], Ref)):
            return parts[0]  # a lone ${expr} keeps its type
        if any(isinstance(p, Ref) for p in parts):
            return Ref("".join(f"${{{p}}}" if isinstance(p, Ref) else str(p) for p in parts))
        return "".join(_to_str(p) for p in parts)

    def expr(self, source: str) -> Any:
        parser = _Parser(source, self)
        result = parser.expression()
        parser.end()
        return result

    def attribute(self, kind: str, rtype: str, rname: str, rest: list[Any]) -> Any:
        """A resource's attribute: known only after apply, so a reference."""
        prefix = ["data"] if kind == "data" else []
        return Ref(".".join(map(str, [*prefix, rtype, rname, *rest])))

    def local(self, name: str) -> Any:
        if name not in self._locals:
            if name not in self.tf["locals"]:
                raise AssertionError(f"no local {name!r}")
            self._locals[name] = self.value(self.tf["locals"][name])
        return self._locals[name]


def _matching_brace(text: str, open_at: int) -> int:
    depth, i, in_str = 0, open_at, False
    while i < len(text):
        c = text[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise Unsupported(f"unbalanced braces in {text!r}")


def _to_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class _Parser:
    FUNCTIONS = {
        "coalesce": lambda *a: next(v for v in a if v is not None and v != ""),
        "tostring": _to_str,
        "upper": lambda s: s.upper(),
        "merge": lambda *maps: {k: v for m in maps for k, v in m.items()},
        "jsondecode": json.loads,
        "jsonencode": lambda v: json.dumps(v, separators=(",", ":")),
        "base64encode": lambda s: base64.b64encode(str(s).encode()).decode(),
    }

    def __init__(self, source: str, ev: Evaluator) -> None:
        self.src, self.pos, self.ev = source, 0, ev

    def peek(self) -> tuple[str, str] | None:
        m = _TOKEN.match(self.src, self.pos)
        if not m or m.end() == m.start():
            return None
        kind = m.lastgroup or ""
        return kind, m.group(kind)

    def take(self, expected: str | None = None) -> tuple[str, str]:
        m = _TOKEN.match(self.src, self.pos)
        if not m:
            raise Unsupported(f"cannot parse {self.src[self.pos:]!r} in {self.src!r}")
        kind = m.lastgroup or ""
        text = m.group(kind)
        if expected is not None and text != expected:
            raise Unsupported(f"expected {expected!r} at {self.src[self.pos:]!r} in {self.src!r}")
        self.pos = m.end()
        return kind, text

    def end(self) -> None:
        if self.src[self.pos :].strip():
            raise Unsupported(f"unsupported expression {self.src!r} (stopped at {self.src[self.pos:]!r})")

    def expression(self) -> Any:
        value = self.primary()
        while (nxt := self.peek()) and nxt[1] == "*":
            self.take("*")
            value = value * self.primary()
        return value

    def primary(self) -> Any:
        kind, text = self.take()
        if kind == "num":
            return float(text) if "." in text else int(text)
        if kind == "str":
            return self.string()
        if text == "{":
            return self.object()
        if kind == "id":
            if text in ("true", "false", "null"):
                return {"true": True, "false": False, "null": None}[text]
            nxt = self.peek()
            if nxt and nxt[1] == "(":
                return self.call(text)
            return self.reference(text)
        raise Unsupported(f"unsupported expression {self.src!r}")

    def string(self) -> Any:
        start = i = self.pos
        depth = 0
        while i < len(self.src):
            c = self.src[i]
            if c == "\\":
                i += 2
                continue
            if c == "$" and self.src[i + 1 : i + 2] == "{":
                i = _matching_brace(self.src, i + 1) + 1
                continue
            if c == '"' and depth == 0:
                self.pos = i + 1
                return self.ev.template(self.src[start:i].replace('\\"', '"'))
            i += 1
        raise Unsupported(f"unterminated string in {self.src!r}")

    def object(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            nxt = self.peek()
            if nxt and nxt[1] == "}":
                self.take("}")
                return out
            kind, key = self.take()
            if kind == "str":
                key = self.string()
            elif kind != "id":
                raise Unsupported(f"object key {key!r} in {self.src!r}")
            sep = self.take()[1]
            if sep not in ("=", ":"):
                raise Unsupported(f"object separator {sep!r} in {self.src!r}")
            out[key] = self.expression()
            nxt = self.peek()
            if nxt and nxt[1] == ",":
                self.take(",")

    def call(self, name: str) -> Any:
        self.take("(")
        if name == "file":
            path = self.expression()
            self.take(")")
            if not str(path).startswith("<module>/"):
                _fail(path)
            return (self.ev.deploy / Path(str(path)).name).read_text()
        if name not in self.FUNCTIONS:
            raise Unsupported(f"function {name}() is not understood by this test's evaluator")
        args = []
        while True:
            nxt = self.peek()
            if nxt and nxt[1] == ")":
                self.take(")")
                break
            args.append(self.expression())
            nxt = self.peek()
            if nxt and nxt[1] == ",":
                self.take(",")
        return self.FUNCTIONS[name](*args)

    def reference(self, root: str) -> Any:
        path = [root]
        while True:
            nxt = self.peek()
            if nxt and nxt[1] == ".":
                self.take(".")
                path.append(self.take()[1])
            elif nxt and nxt[1] == "[":
                self.take("[")
                path.append(self.expression())
                self.take("]")
            else:
                break
        return self.resolve(path)

    def resolve(self, path: list[Any]) -> Any:
        root = path[0]
        if root == "var":
            value, rest = self.ev.vars[path[1]], path[2:]
        elif root == "local":
            value, rest = self.ev.local(path[1]), path[2:]
        elif root == "path" and path[1] == "module":
            return "<module>"
        elif root in ("each", "count", "env"):
            return Ref(".".join(map(str, path)))
        else:
            kind = "data" if root == "data" else "resource"
            rtype, rname = (path[1], path[2]) if kind == "data" else (path[0], path[1])
            if rname not in self.ev.tf[kind].get(rtype, {}):
                raise AssertionError(f"reference to undeclared {kind} {rtype}.{rname}")
            return self.ev.attribute(kind, rtype, rname, path[3:] if kind == "data" else path[2:])
        for key in rest:
            if isinstance(value, Ref):
                return Ref(f"{value}.{key}")
            value = value[key]
        return value


def _fail(path: Any) -> Any:
    raise Unsupported(f"file({path!r}) outside deploy/")




class Deployed(Evaluator):
    """Evaluates deploy/ as it would be deployed into `variables["project"]`: resource attributes get the values
    Google would give them (service account emails, names and ids), so bindings name real principals and resources.
    An attribute this reading does not know fails loudly."""

    PROJECT_NUMBER = "000000000000"  # a local stand-in: no project number exists offline

    def attribute(self, kind: str, rtype: str, rname: str, rest: list[Any]) -> Any:
        body = self.tf[kind][rtype][rname]
        project = self.vars["project"]
        attr = rest[0] if rest else "id"
        if rtype == "google_service_account":
            email = f"{self.value(body['account_id'])}@{project}.iam.gserviceaccount.com"
            values = {"email": email, "member": f"serviceAccount:{email}",
                      "name": f"projects/{project}/serviceAccounts/{email}",
                      "id": f"projects/{project}/serviceAccounts/{email}"}
        elif rtype == "google_project_iam_custom_role":
            role_id = self.value(body["role_id"])
            values = {"id": f"projects/{project}/roles/{role_id}", "name": f"projects/{project}/roles/{role_id}",
                      "role_id": role_id}
        elif rtype == "google_project" and kind == "data":
            values = {"number": self.PROJECT_NUMBER, "project_id": project}
        elif rtype == "google_storage_project_service_account" and kind == "data":
            email = f"service-{self.PROJECT_NUMBER}@gs-project-accounts.iam.gserviceaccount.com"
            values = {"email_address": email, "member": f"serviceAccount:{email}"}
        elif attr in body:
            values = {attr: self.value(body[attr])}
        elif attr == "id" and "name" in body:
            values = {"id": self.value(body["name"])}
        else:
            values = {}
        if attr not in values:
            raise Unsupported(f"{rtype}.{rname}.{attr}: not known before apply to this reading of deploy/")
        value = values[attr]
        for key in rest[1:]:
            value = value[key]
        return value
