"""What deploy/iam.tf grants, as a policy the local stack enforces: who may do what on which resource.

The bindings are read from the Terraform itself (bqx.local.terraform.Deployed), so a grant missing there is a 403
here. Role contents come from Google's reference of predefined roles; only the roles deploy/ uses (and custom roles,
whose permissions the Terraform lists) are known, and an unknown role grants nothing, loudly in the gate's log.
Conditions are evaluated for the subset of CEL that IAM conditions on resource names use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bqx.local.terraform import DEPLOY, Deployed, Unsupported, deploy_texts, load_tf

# Permissions of the predefined roles deploy/ grants. Source: Google Cloud, "IAM roles and permissions index"
# (https://cloud.google.com/iam/docs/roles-permissions/storage, .../run, .../iam), read 2026-12; the resourcemanager
# and folder permissions these roles also carry are left out: nothing here asks for them.
PREDEFINED_ROLES: dict[str, frozenset[str]] = {
    "roles/storage.objectViewer": frozenset({"storage.objects.get", "storage.objects.list"}),
    "roles/storage.objectCreator": frozenset({"storage.objects.create", "storage.multipartUploads.create",
                                              "storage.multipartUploads.abort",
                                              "storage.multipartUploads.listParts"}),
    "roles/storage.objectUser": frozenset({"storage.objects.create", "storage.objects.delete", "storage.objects.get",
                                           "storage.objects.list", "storage.objects.restore",
                                           "storage.objects.update", "storage.multipartUploads.create",
                                           "storage.multipartUploads.abort", "storage.multipartUploads.list",
                                           "storage.multipartUploads.listParts"}),
    "roles/storage.objectAdmin": frozenset({"storage.objects.create", "storage.objects.delete", "storage.objects.get",
                                            "storage.objects.list", "storage.objects.restore",
                                            "storage.objects.update", "storage.objects.getIamPolicy",
                                            "storage.objects.setIamPolicy", "storage.multipartUploads.create",
                                            "storage.multipartUploads.abort", "storage.multipartUploads.list",
                                            "storage.multipartUploads.listParts"}),
    "roles/run.invoker": frozenset({"run.jobs.run", "run.routes.invoke"}),
    "roles/run.jobsExecutor": frozenset({"run.jobs.run", "run.jobs.get", "run.executions.get",
                                         "run.executions.list"}),
    "roles/run.jobsExecutorWithOverrides": frozenset({"run.jobs.run", "run.jobs.runWithOverrides", "run.jobs.get",
                                                      "run.executions.get", "run.executions.list"}),
    "roles/run.viewer": frozenset({"run.jobs.get", "run.jobs.list", "run.executions.get", "run.executions.list"}),
    "roles/iam.serviceAccountUser": frozenset({"iam.serviceAccounts.actAs", "iam.serviceAccounts.get",
                                               "iam.serviceAccounts.list"}),
    "roles/iam.serviceAccountTokenCreator": frozenset({"iam.serviceAccounts.getAccessToken",
                                                       "iam.serviceAccounts.signBlob",
                                                       "iam.serviceAccounts.signJwt",
                                                       "iam.serviceAccounts.getOpenIdToken"}),
}

# Terraform IAM member resources -> the attribute naming the resource they grant on, and how to name it.
_SCOPES: dict[str, tuple[str, str]] = {
    "google_storage_bucket_iam_member": ("bucket", "projects/_/buckets/{}"),
    "google_cloud_run_v2_job_iam_member": ("name", "jobs/{}"),
    "google_service_account_iam_member": ("service_account_id", "{}"),
    "google_project_iam_member": ("project", "projects/{}"),
}


class PolicyError(Exception):
    """deploy/ holds something this reading of IAM does not understand."""


@dataclass(frozen=True)
class Binding:
    scope: str  # "projects/P", "projects/_/buckets/B", "jobs/J", "projects/P/serviceAccounts/E"
    role: str
    member: str
    condition: str | None
    source: str  # the Terraform resource, for messages


@dataclass(frozen=True)
class Resource:
    """What a call touches: its full IAM name (used by conditions) and the scopes whose bindings apply to it."""

    name: str
    scopes: tuple[str, ...]

    @classmethod
    def bucket(cls, project: str, bucket: str) -> Resource:
        return cls(f"projects/_/buckets/{bucket}", (f"projects/_/buckets/{bucket}", f"projects/{project}"))

    @classmethod
    def object(cls, project: str, bucket: str, name: str) -> Resource:
        return cls(f"projects/_/buckets/{bucket}/objects/{name}",
                   (f"projects/_/buckets/{bucket}", f"projects/{project}"))

    @classmethod
    def job(cls, project: str, region: str, job: str) -> Resource:
        return cls(f"projects/{project}/locations/{region}/jobs/{job}", (f"jobs/{job}", f"projects/{project}"))

    @classmethod
    def service_account(cls, project: str, email: str) -> Resource:
        name = f"projects/{project}/serviceAccounts/{email}"
        return cls(name, (name, f"projects/{project}"))


class Policy:
    def __init__(self, bindings: list[Binding], custom_roles: dict[str, frozenset[str]]) -> None:
        self.bindings = bindings
        self.roles = {**PREDEFINED_ROLES, **custom_roles}

    @classmethod
    def from_terraform(cls, variables: dict[str, Any], deploy: Path = DEPLOY) -> Policy:
        tf = load_tf(deploy_texts(deploy))
        ev = Deployed(tf, variables, deploy)
        custom = {ev.value(f"${{google_project_iam_custom_role.{name}.id}}"): frozenset(ev.value(body["permissions"]))
                  for name, body in tf["resource"].get("google_project_iam_custom_role", {}).items()}
        bindings = []
        for rtype, (attr, fmt) in _SCOPES.items():
            for rname, body in tf["resource"].get(rtype, {}).items():
                conditions = ev.value(body.get("condition") or [])
                if len(conditions) > 1:
                    raise PolicyError(f"{rtype}.{rname}: more than one condition block")
                members = [body["member"]] if "member" in body else body.get("members", [])
                for member in members:
                    bindings.append(Binding(fmt.format(ev.value(body[attr])), ev.value(body["role"]),
                                            ev.value(member), conditions[0]["expression"] if conditions else None,
                                            f"{rtype}.{rname}"))
        return cls(bindings, custom)

    def member_for(self, email: str) -> str:
        return f"serviceAccount:{email}"

    def allows(self, member: str, permission: str, resource: Resource) -> Binding | None:
        """The binding that grants `permission` on `resource` to `member`, or None."""
        for b in self.bindings:
            if b.member != member or b.scope not in resource.scopes:
                continue
            if permission not in self.roles.get(b.role, frozenset()):
                continue
            if b.condition is not None and not condition_holds(b.condition, resource.name):
                continue
            return b
        return None

    def unknown_roles(self) -> set[str]:
        return {b.role for b in self.bindings} - set(self.roles)


# ---------------------------------------------------------------- IAM conditions (a CEL subset)

_CEL_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<op>&&|\|\||==|!=|[()!])|'
                        r'(?P<call>resource\.name\.(?:startsWith|endsWith)\()|(?P<name>resource\.name))')


def condition_holds(expression: str, resource_name: str) -> bool:
    """Evaluate `resource.name.startsWith("...")`, `.endsWith`, `resource.name == "..."`, `!=`, `&&`, `||`, `!`
    and parentheses; anything else is refused (a condition the gate cannot read must not grant)."""
    tokens = _cel_tokens(expression)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take(expected: str | None = None) -> str:
        nonlocal pos
        if pos >= len(tokens) or (expected is not None and tokens[pos] != expected):
            raise Unsupported(f"IAM condition {expression!r}: expected {expected or 'more'} at token {pos}")
        pos += 1
        return tokens[pos - 1]

    def literal() -> str:
        tok = take()
        if not tok.startswith('"'):
            raise Unsupported(f"IAM condition {expression!r}: expected a string, got {tok!r}")
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape")

    def atom() -> bool:
        tok = take()
        if tok == "!":
            return not atom()
        if tok == "(":
            value = disjunction()
            take(")")
            return value
        if tok.startswith("resource.name.startsWith(") or tok.startswith("resource.name.endsWith("):
            arg = literal()
            take(")")
            return resource_name.startswith(arg) if "startsWith" in tok else resource_name.endswith(arg)
        if tok == "resource.name":
            op = take()
            if op not in ("==", "!="):
                raise Unsupported(f"IAM condition {expression!r}: operator {op!r}")
            return (resource_name == literal()) == (op == "==")
        raise Unsupported(f"IAM condition {expression!r}: {tok!r} is not understood")

    def conjunction() -> bool:
        value = atom()
        while peek() == "&&":
            take()
            value = atom() and value
        return value

    def disjunction() -> bool:
        value = conjunction()
        while peek() == "||":
            take()
            value = conjunction() or value
        return value

    result = disjunction()
    if pos != len(tokens):
        raise Unsupported(f"IAM condition {expression!r}: trailing {tokens[pos:]}")
    return result


def _cel_tokens(expression: str) -> list[str]:
    out, pos = [], 0
    while pos < len(expression):
        if expression[pos:].strip() == "":
            break
        m = _CEL_TOKEN.match(expression, pos)
        if not m or m.end() == pos:
            raise Unsupported(f"IAM condition {expression!r}: cannot read {expression[pos:]!r}")
        out.append(m.group(m.lastgroup or "").strip())
        pos = m.end()
    return out


def job_accounts(variables: dict[str, Any], deploy: Path = DEPLOY) -> dict[str, str]:
    """{Cloud Run job name: the email of the account its tasks run as}, from deploy/ (what starting it acts as)."""
    tf = load_tf(deploy_texts(deploy))
    ev = Deployed(tf, variables, deploy)
    return {ev.value(body["name"]): ev.value(body["template"][0]["template"][0]["service_account"])
            for body in tf["resource"].get("google_cloud_run_v2_job", {}).values()}


def service_accounts(variables: dict[str, Any], deploy: Path = DEPLOY) -> dict[str, str]:
    """The account each component runs as in the deployment: {"trigger"|"completion"|"extract"|"merge": email},
    read from the functions' service_config and the jobs' task template in deploy/."""
    tf = load_tf(deploy_texts(deploy))
    ev = Deployed(tf, variables, deploy)
    out = {}
    for name, body in tf["resource"].get("google_cloudfunctions2_function", {}).items():
        out[name] = ev.value(body["service_config"][0]["service_account_email"])
    for name, body in tf["resource"].get("google_cloud_run_v2_job", {}).items():
        out[name] = ev.value(body["template"][0]["template"][0]["service_account"])
    missing = {"trigger", "completion", "extract", "merge"} - set(out)
    if missing:
        raise PolicyError(f"deploy/ declares no function or job named {sorted(missing)}")
    return out
