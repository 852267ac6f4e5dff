#!/usr/bin/env python3
"""Checks the Helm chart, the examples and the Argo CD health check and actions.

Run from the repository root with the project's venv (scripts/setup.sh creates it):

    .venv/bin/python scripts/check_chart.py

What it checks (each line of output is one check; the last line is `N passed, M failed`):
- the chart's crds/ is byte-identical to crds/connector.yaml;
- `helm lint --strict` (Helm's own library, bundled by helm-python-sdk) for every value set;
- values.schema.json accepts every value set and rejects each bad one in helm/ci/bad-values-schema.yaml;
- every object rendered (real Helm engine) for every value set validates with kubernetes-validate in
  strict mode for Kubernetes KUBE_VERSION (monitoring.coreos.com kinds: helm/ci/monitoring-schemas.json);
- RBAC rendered equals exactly what `cargo run -q -p obsrv-operator -- print-rbac` declares, in both
  cluster-wide and namespaced mode, and the chart's files/rbac-rules.json is that same list;
- every flag the Deployment passes is one `obsrv-operator --help` knows;
- the operator Deployment meets Pod Security "restricted", leader election follows replicas, the sink
  defaults and watched namespaces reach the flags;
- no rendered object holds a secret value (and the detector does catch helm/ci/bad-values-secret-env.yaml);
- PrometheusRule expressions parse as PromQL and use only metrics the operator / runtime register;
- helm/ci/alert-rules.yaml is the rendered PrometheusRule (`--write-rules` refreshes it); `promtool check
  rules` accepts it and every value set's rules; `promtool test rules helm/ci/alert-tests.yaml` passes,
  has a firing and a quiet case for every alert, and fails on a changed threshold, selector or `for:`;
- the Grafana dashboard (dashboards/obsrv-connectors.json): datasource, namespace and connector
  variables used by every query, every panel's queries evaluated by promtool on sample series
  (helm/ci/dashboard-tests.yaml), queries that parse as PromQL, metrics the operator / runtime export
  (or kube-state-metrics' and `up`, listed), labels those series carry (the runtime's own, the
  PodMonitor's relabelings from pod labels the operator sets, the Prometheus Operator's target
  labels); the optional dashboard ConfigMap holds the same JSON; docs/monitoring.md explains every
  alert and panel;
- examples/: one Connector per source kind, each valid against the CRD's schema (strict: unknown fields
  fail), each Secret it references present in the same file with the keys it names;
- files/argocd-health.lua (run by real Lua 5.1, as Argo CD's gopher-lua) gives the expected health for
  every fixture in helm/ci/argocd-health-fixtures.yaml, the pause/resume/stop resource actions change
  only spec.state, and docs/gitops.md carries every script verbatim;
- self-tests that the checks can fail: a broken template, an unknown field, a missing or an extra
  permission, a literal secret in values.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import traceback
from pathlib import Path
from typing import Any, Callable

try:
    import helm_python as helm
    import jsonschema
    import kubernetes_validate
    import lupa.lua51 as lua51
    import promql_parser
    import yaml
except ImportError as exc:  # pragma: no cover - environment problem, explained to the user
    sys.exit(
        f"check_chart: missing Python package ({exc}). Create the venv first:\n"
        "  python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-chart.txt"
    )

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "obsrv-connectors"
CI = ROOT / "helm" / "ci"
EXAMPLES = ROOT / "examples"
CRD_FILE = ROOT / "crds" / "connector.yaml"
KUBE_VERSION = "1.33.0"
RELEASE = "obsrv-connectors"
RELEASE_NAMESPACE = "obsrv-system"

# Resources the operator may declare that are cluster-scoped: a Role cannot grant them.
CLUSTER_SCOPED = {
    "customresourcedefinitions",
    "namespaces",
    "nodes",
    "persistentvolumes",
    "clusterroles",
    "clusterrolebindings",
    "storageclasses",
    "priorityclasses",
}
LEASE_GROUP = "coordination.k8s.io"

def source_kinds() -> list[str]:
    """The source kinds: the fields of spec.source in the committed CRD (from the kind registry)."""
    crd = yaml.safe_load((ROOT / "crds" / "connector.yaml").read_text(encoding="utf-8"))
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return sorted(schema["properties"]["spec"]["properties"]["source"]["properties"])


SOURCE_KINDS = source_kinds()


class CheckFailed(Exception):
    """A check's assertion did not hold; the message says what and where."""


def require(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


class Runner:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.failures: list[str] = []

    def check(self, name: str, fn: Callable[[], str | None]) -> None:
        try:
            detail = fn()
        except CheckFailed as exc:
            self.failed += 1
            self.failures.append(name)
            print(f"FAIL {name}\n     {str(exc).strip()}".replace("\n", "\n     "))
            return
        except Exception as exc:  # a crash in a check is a failure, with the stack to debug it
            self.failed += 1
            self.failures.append(name)
            print(f"FAIL {name}: unexpected {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=3)
            return
        self.passed += 1
        print(f"ok   {name}" + (f" ({detail})" if detail else ""))


# ---------------------------------------------------------------------------------------------------
# Value sets and rendering


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def value_sets() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("default", {}),
        ("namespaced-ha", load_yaml(CI / "values-namespaced-ha.yaml")),
        ("cluster-custom", load_yaml(CI / "values-cluster-custom.yaml")),
        ("bring-your-own", load_yaml(CI / "values-bring-your-own.yaml")),
    ]


def render(values: dict[str, Any]) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """Render the chart like `helm template`: (objects, NOTES.txt, merged values)."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        merged = chart.merge_values(values)
        manifests = chart.render(values, name=RELEASE, namespace=RELEASE_NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            require(isinstance(doc, dict), f"{path}: rendered a non-object YAML document: {doc!r}")
            doc["__source__"] = path
            objects.append(doc)
    return objects, notes, merged


def strip(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "__source__"}


def ident(obj: dict[str, Any]) -> str:
    md = obj.get("metadata", {})
    ns = md.get("namespace")
    return f"{obj.get('kind')}/{(ns + '/') if ns else ''}{md.get('name')} ({obj.get('__source__', '?')})"


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind]


# ---------------------------------------------------------------------------------------------------
# Schema validation


def monitoring_validator(kind: str) -> jsonschema.protocols.Validator:
    schemas = json.loads((CI / "monitoring-schemas.json").read_text(encoding="utf-8"))
    schema = dict(schemas[kind])
    schema["definitions"] = schemas["definitions"]
    return jsonschema.Draft7Validator(schema)


def validate_k8s(obj: dict[str, Any]) -> None:
    body = strip(obj)
    kind = body.get("kind", "")
    if body.get("apiVersion") == "monitoring.coreos.com/v1":
        errors = sorted(monitoring_validator(kind).iter_errors(body), key=lambda e: list(e.path))
        if errors:
            raise CheckFailed(
                f"{ident(obj)}: " + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
            )
        return
    try:
        kubernetes_validate.validate(body, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise CheckFailed(f"{ident(obj)}: {'.'.join(map(str, e.path))}: {e.message}") from None
    except kubernetes_validate.utils.SchemaNotFoundError as e:
        raise CheckFailed(f"{ident(obj)}: no schema to validate it: {e.message}") from None


def openapi_to_jsonschema(node: Any) -> Any:
    """An apiextensions openAPIV3Schema as a JSON schema, strict like the API server's field
    validation: unknown fields fail unless x-kubernetes-preserve-unknown-fields says otherwise."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    for key in ("properties",):
        if key in node:
            out[key] = {name: openapi_to_jsonschema(s) for name, s in node[key].items()}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def connector_validator() -> jsonschema.protocols.Validator:
    crd = load_yaml(CRD_FILE)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"const": "obsrv.io/v1alpha1"}
    props["kind"] = {"const": "Connector"}
    props["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
        },
    }
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    schema["additionalProperties"] = False
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator: jsonschema.protocols.Validator, obj: Any) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    ]


# ---------------------------------------------------------------------------------------------------
# RBAC


Triple = tuple[str, str, str]


def triples(rules: list[dict[str, Any]]) -> set[Triple]:
    out: set[Triple] = set()
    for r in rules:
        require(not r.get("resourceNames") and not r.get("nonResourceURLs"), f"unexpected rule shape: {r}")
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                for v in r.get("verbs", []):
                    out.add((g, res, v))
    return out


def fmt(ts: set[Triple]) -> str:
    return ", ".join(f"{v} {g or 'core'}/{r}" for g, r, v in sorted(ts))


def compare_rbac(declared: set[Triple], granted: set[Triple], where: str) -> None:
    missing = declared - granted
    extra = granted - declared
    problems = []
    if missing:
        problems.append(f"missing (the operator declares them, {where} does not grant): {fmt(missing)}")
    if extra:
        problems.append(f"extra (granted by {where}, not declared by the operator): {fmt(extra)}")
    require(not problems, "\n".join(problems))


def declared_rbac() -> list[dict[str, Any]]:
    """The operator's own list, from its binary."""
    cmd = ["cargo", "run", "-q", "-p", "obsrv-operator", "--", "print-rbac"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError:
        raise CheckFailed(
            "cargo not found: install Rust (scripts/setup.sh) to run `obsrv-operator print-rbac`"
        ) from None
    require(
        proc.returncode == 0,
        f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}",
    )
    try:
        rules = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise CheckFailed(f"print-rbac did not print JSON ({exc}): {proc.stdout[:500]!r}") from None
    require(isinstance(rules, list) and rules, f"print-rbac printed no rules: {proc.stdout[:500]!r}")
    return rules


def operator_help() -> str:
    cmd = ["cargo", "run", "-q", "-p", "obsrv-operator", "--", "--help"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    require(
        proc.returncode == 0,
        f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}",
    )
    return proc.stdout


def leader_election_on(values: dict[str, Any]) -> bool:
    return bool(values["leaderElection"]["enabled"]) or int(values["replicas"]) > 1


def check_rbac(objects: list[dict[str, Any]], values: dict[str, Any], declared: set[Triple]) -> str:
    sa_name = operator_deployment(objects)["spec"]["template"]["spec"]["serviceAccountName"]
    sas = [o["metadata"]["name"] for o in of_kind(objects, "ServiceAccount")]
    if values["serviceAccount"]["create"]:
        require(sas == [sa_name], f"ServiceAccount {sa_name} used by the Deployment, rendered: {sas}")
    else:
        require(not sas, f"serviceAccount.create=false but the chart renders {sas}")
    rbac_kinds = ("ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding")
    if not values["rbac"]["create"]:
        rendered_rbac = [ident(o) for o in objects if o["kind"] in rbac_kinds]
        require(not rendered_rbac, f"rbac.create=false but the chart renders {rendered_rbac}")
        return "rbac.create=false: no RBAC rendered (the user grants print-rbac's rules)"
    subject = {"kind": "ServiceAccount", "name": sa_name, "namespace": RELEASE_NAMESPACE}
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in objects
        if o["kind"] in ("ClusterRole", "Role")
    }
    bound: list[tuple[str | None, dict[str, Any]]] = []  # (namespace or None for cluster-wide, role)
    for b in objects:
        if b["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        require(
            b.get("subjects") == [subject], f"{ident(b)} binds {b.get('subjects')}, expected only {subject}"
        )
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        key = (ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])
        require(
            key in roles, f"{ident(b)} refers to {ref['kind']} {ref['name']}, which the chart does not render"
        )
        bound.append((ns, roles[key]))
    unbound = {k for k in roles} - {
        (r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]) for _, r in bound
    }
    require(not unbound, f"roles rendered but bound to nobody: {sorted(unbound)}")

    for _, role in bound:
        for g, r, v in triples(role["rules"]):
            require("*" not in (g, r, v), f"{ident(role)} grants a wildcard: {v} {g}/{r}")

    lease = {t for t in declared if t[0] == LEASE_GROUP}
    cluster_scoped = {t for t in declared if t[1].split("/")[0] in CLUSTER_SCOPED}
    namespaced = declared - lease - cluster_scoped
    leader = leader_election_on(values)
    expected = declared if leader else declared - lease

    granted_all: set[Triple] = set()
    for _, role in bound:
        granted_all |= triples(role["rules"])
    compare_rbac(expected, granted_all, "the chart")

    watched = values["watch"]["namespaces"]
    cluster_grants = set().union(*[triples(r["rules"]) for ns, r in bound if ns is None]) if bound else set()
    if watched:
        compare_rbac(cluster_scoped, cluster_grants, "the chart's ClusterRole in namespaced mode")
        for ns in watched:
            ns_grants = set().union(*[triples(r["rules"]) for n, r in bound if n == ns] or [set()])
            compare_rbac(namespaced, ns_grants, f"the Role in watched namespace {ns}")
        extra_ns = {n for n, _ in bound if n is not None} - set(watched) - {RELEASE_NAMESPACE}
        require(not extra_ns, f"Roles in namespaces that are not watched: {sorted(extra_ns)}")
    else:
        compare_rbac(cluster_scoped | namespaced, cluster_grants, "the chart's ClusterRole")
    lease_grants = set().union(
        *[
            triples(r["rules"])
            for n, r in bound
            if n == RELEASE_NAMESPACE
            and r["kind"] == "Role"
            and any(t[0] == LEASE_GROUP for t in triples(r["rules"]))
        ]
        or [set()]
    )
    if leader:
        compare_rbac(lease, lease_grants, f"the leader-election Role in {RELEASE_NAMESPACE}")
    else:
        require(not lease_grants, "leader election is off but the chart grants Lease access")
    mode = f"namespaced: {', '.join(watched)}" if watched else "cluster-wide"
    return f"{len(expected)} permissions, {mode}, leader election {'on' if leader else 'off'}"


# ---------------------------------------------------------------------------------------------------
# Secrets

SECRET_NAME = re.compile(
    r"(PASS(WORD|WD)?|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|SASL_?JAAS)", re.I
)
SECRET_TEXT = [
    re.compile(r"(password|passwd|secret|token)\s*[=:]\s*\S+", re.I),  # key=value / key: value
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),  # user:password@ in a URL
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\."),  # a JWT
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # an AWS access key id
]


def walk(node: Any, path: str = ""):
    """Every (path, node) of a YAML tree, the root included."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def secret_findings(objects: list[dict[str, Any]]) -> list[str]:
    found: list[str] = []
    for o in objects:
        body = strip(o)
        if body.get("kind") == "Secret" and (body.get("data") or body.get("stringData")):
            found.append(f"{ident(o)}: a Secret with data is rendered by the chart")
        for path, node in walk(body):
            if re.search(r"(^|\.)env\[\d+\]$", path) and isinstance(node, dict):
                name, value = str(node.get("name", "")), node.get("value")
                if value not in (None, "") and SECRET_NAME.search(name):
                    found.append(
                        f"{ident(o)}: env {name} at {path} holds a literal value; use valueFrom.secretKeyRef"
                    )
            elif isinstance(node, str):
                for pattern in SECRET_TEXT:
                    if pattern.search(node):
                        found.append(f"{ident(o)}: {path} looks like it holds a secret ({pattern.pattern})")
                        break
    return found


# ---------------------------------------------------------------------------------------------------
# Checks on one rendered value set


def operator_deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deps = [d for d in of_kind(objects, "Deployment")]
    require(len(deps) == 1, f"expected one Deployment, rendered {len(deps)}")
    return deps[0]


def flag_values(args: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for a in args:
        require(a.startswith("--") and "=" in a, f"operator arg {a!r} is not --flag=value")
        k, v = a[2:].split("=", 1)
        require(k not in out, f"flag --{k} passed twice")
        out[k] = v
    return out


def check_deployment(objects: list[dict[str, Any]], values: dict[str, Any]) -> str:
    dep = operator_deployment(objects)
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    require(
        spec["replicas"] == values["replicas"], f"replicas {spec['replicas']} != values {values['replicas']}"
    )
    psc = pod.get("securityContext", {})
    require(psc.get("runAsNonRoot") is True, "pod securityContext.runAsNonRoot must be true")
    require(
        psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        "pod seccompProfile must be RuntimeDefault",
    )
    require(
        not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"),
        "host namespaces used",
    )
    require(len(pod["containers"]) == 1, "one operator container expected")
    c = pod["containers"][0]
    sc = c.get("securityContext", {})
    require(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
    require(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
    require(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities.drop must be [ALL]")
    require(not sc.get("capabilities", {}).get("add"), "no capabilities may be added")
    require(not sc.get("privileged"), "privileged container")

    flags = flag_values(c.get("args", []))
    leader = leader_election_on(values)
    require(
        flags.get("leader-election") == ("true" if leader else "false"),
        f"--leader-election={flags.get('leader-election')} but replicas={values['replicas']}, "
        f"leaderElection.enabled={values['leaderElection']['enabled']}",
    )
    if leader:
        require(
            flags.get("lease-namespace") == RELEASE_NAMESPACE,
            "--lease-namespace must be the release namespace",
        )
        require(
            flags.get("lease-name") == values["leaderElection"]["leaseName"],
            "--lease-name must follow values",
        )
    else:
        require(
            spec.get("strategy", {}).get("type") == "Recreate",
            "without leader election two operator pods must never overlap (strategy Recreate)",
        )
    watched = values["watch"]["namespaces"]
    require(
        flags.get("namespaces", "") == ",".join(watched),
        f"--namespaces={flags.get('namespaces')} != {watched}",
    )
    sink = values["sink"]
    for flag, key in [
        ("sink-topic", "topic"),
        ("sink-failed-topic", "failedTopic"),
        ("sink-state-topic", "stateTopic"),
        ("sink-max-message-bytes", "maxMessageBytes"),
        ("sink-compression", "compression"),
        ("sink-bootstrap-servers", "bootstrapServers"),
    ]:
        want_flag = str(sink[key]) if sink[key] != "" else None  # an empty value leaves the flag out
        require(
            flags.get(flag) == want_flag, f"--{flag}={flags.get(flag)!r} but values sink.{key}={sink[key]!r}"
        )
    img = values["connectorImage"]
    want = f"{img['repository']}:{img['tag'] or '0.1.0'}"
    require(
        flags.get("connector-image") == want, f"--connector-image={flags.get('connector-image')} != {want}"
    )
    port = values["adminPort"]
    require(flags.get("admin-addr") == f"0.0.0.0:{port}", f"--admin-addr must listen on {port}")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    require(ports.get("admin") == port, f"container port admin != {port}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        require(c.get(probe, {}).get("httpGet", {}).get("path") == path, f"{probe} must GET {path}")

    svcs = of_kind(objects, "Service")
    require(len(svcs) == 1, "one metrics Service expected")
    svc = svcs[0]
    labels = spec["template"]["metadata"]["labels"]
    require(
        all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()),
        "Service selector does not match the operator pods",
    )
    require(
        svc["spec"]["ports"][0]["port"] == port and svc["spec"]["ports"][0]["targetPort"] == "admin",
        "Service must expose the admin port",
    )
    pdbs = of_kind(objects, "PodDisruptionBudget")
    require(
        bool(pdbs) == (values["replicas"] > 1 and values["podDisruptionBudget"]["enabled"]),
        "PDB only with more than one replica",
    )
    return f"{len(flags)} flags, leader election {'on' if leader else 'off'}"


def check_flags_known(objects: list[dict[str, Any]], help_text: str) -> None:
    c = operator_deployment(objects)["spec"]["template"]["spec"]["containers"][0]
    known = set(re.findall(r"--([a-z][a-z0-9-]+)", help_text))
    unknown = [k for k in flag_values(c.get("args", [])) if k not in known]
    require(not unknown, f"the chart passes flags obsrv-operator does not know: {unknown}")


METRIC_SOURCES = [ROOT / "operator" / "src" / "metrics.rs", ROOT / "connector-image" / "src" / "metrics.rs"]


def exported_metrics() -> set[str]:
    """Series names the operator and the runtime register with prometheus-client (a counter is
    exposed with `_total`, a histogram with `_bucket`/`_sum`/`_count`)."""
    out: set[str] = set()
    for path in METRIC_SOURCES:
        require(path.exists(), f"{path.relative_to(ROOT)} missing: cannot tell which metrics exist")
        src = path.read_text(encoding="utf-8")
        prefix = re.search(r'Registry::with_prefix\(\s*"([a-z_]+)"', src)
        require(prefix is not None, f"{path.relative_to(ROOT)}: no Registry::with_prefix(..)")
        for name in re.findall(r'\.register(?:_with_unit)?\(\s*"([a-z_]+)"', src):
            base = f"{prefix.group(1)}_{name}"
            out |= {base, f"{base}_total", f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return out


def check_monitoring(objects: list[dict[str, Any]], values: dict[str, Any]) -> str:
    mon = values["monitoring"]
    require(
        bool(of_kind(objects, "ServiceMonitor")) == mon["serviceMonitor"]["enabled"],
        "ServiceMonitor presence != values",
    )
    require(
        bool(of_kind(objects, "PodMonitor")) == mon["podMonitor"]["enabled"], "PodMonitor presence != values"
    )
    require(
        bool(of_kind(objects, "PrometheusRule")) == mon["prometheusRule"]["enabled"],
        "PrometheusRule presence != values",
    )
    require(
        bool(of_kind(objects, "NetworkPolicy")) == values["networkPolicy"]["enabled"],
        "NetworkPolicy presence != values",
    )
    metrics: set[str] = set()
    alerts: list[str] = []
    for rule_obj in of_kind(objects, "PrometheusRule"):
        for group in rule_obj["spec"]["groups"]:
            for rule in group["rules"]:
                try:
                    promql_parser.parse(rule["expr"])
                except ValueError as exc:
                    raise CheckFailed(
                        f"alert {rule.get('alert')}: expr is not valid PromQL ({exc}): {rule['expr']}"
                    ) from None
                metrics |= set(re.findall(r"\b(obsrv_[a-z_]+)\b", rule["expr"]))
                alerts.append(rule.get("alert", rule.get("record", "?")))
    if metrics:
        exported = exported_metrics()
        unknown = sorted(m for m in metrics if m not in exported)
        require(
            not unknown,
            f"alerts use metrics that neither operator/src nor connector-image/src exports: {unknown}"
            f" (exported: {', '.join(sorted(exported))})",
        )
    if mon["prometheusRule"]["enabled"]:
        for want in (
            "ObsrvConnectorNotReady",
            "ObsrvConnectorLagGrowing",
            "ObsrvConnectorFailedRecords",
            "ObsrvOperatorReconcileErrors",
        ):
            require(want in alerts, f"alert {want} missing")
        return f"alerts {', '.join(alerts)}; metrics {', '.join(sorted(metrics))}"
    return "monitoring off"


# ---------------------------------------------------------------------------------------------------
# Monitoring: the alert rules under promtool, and the Grafana dashboard

ALERT_RULES = CI / "alert-rules.yaml"
ALERT_TESTS = CI / "alert-tests.yaml"
DASHBOARD_TESTS = CI / "dashboard-tests.yaml"
DASHBOARD = CHART / "dashboards" / "obsrv-connectors.json"
MONITORING_DOC = ROOT / "docs" / "monitoring.md"
# The value set helm/ci/alert-rules.yaml is rendered from: the chart's defaults, alerts on.
RULES_VALUES: dict[str, Any] = {"monitoring": {"prometheusRule": {"enabled": True}}}
RULES_HEADER = (
    "# GENERATED from helm/obsrv-connectors/templates/prometheusrule.yaml (release obsrv-connectors in\n"
    "# obsrv-system, default values): the PrometheusRule's spec, as Prometheus loads it. promtool checks\n"
    "# it and helm/ci/alert-tests.yaml unit-tests it. Do not edit; refresh with\n"
    "#   .venv/bin/python scripts/check_chart.py --write-rules\n"
)
# Series that come from outside the project: Prometheus' own `up`, and kube-state-metrics for
# container restarts (docs/monitoring.md says it must run, with pod labels allowed).
EXTERNAL_METRICS = {"up", "kube_pod_container_status_restarts_total", "kube_pod_labels"}
# Labels the Prometheus Operator puts on every series of a PodMonitor's / ServiceMonitor's targets
# (besides the monitor's own relabelings), and Prometheus' `instance`.
SCRAPE_TARGET_LABELS = {"namespace", "pod", "container", "job", "endpoint", "service", "instance"}
# Grafana's built-in interval variables, and the dashboard's own variables, as PromQL-safe stand-ins.
GRAFANA_INTERVALS = ("$__rate_interval", "$__interval", "$__range")


def rendered_rules_text() -> str:
    objects, _, _ = render(RULES_VALUES)
    rules = of_kind(objects, "PrometheusRule")
    require(len(rules) == 1, f"expected one PrometheusRule with {RULES_VALUES}, rendered {len(rules)}")
    return RULES_HEADER + yaml.safe_dump(rules[0]["spec"], sort_keys=False, width=100)


def write_rules() -> int:
    ALERT_RULES.write_text(rendered_rules_text(), encoding="utf-8")
    print(f"wrote {ALERT_RULES.relative_to(ROOT)}")
    return 0


def promtool() -> str:
    path = shutil.which("promtool")
    require(
        path is not None,
        "promtool not found: run scripts/setup.sh (it installs Debian's prometheus package for promtool)",
    )
    return path  # type: ignore[return-value]


def run_promtool(*args: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    out = (proc.stdout + proc.stderr).strip()
    require(proc.returncode == 0, f"`promtool {' '.join(args)}` failed (exit {proc.returncode}):\n{out[-4000:]}")
    return out


def alert_names(rules_spec: dict[str, Any]) -> list[str]:
    return [r["alert"] for g in rules_spec["groups"] for r in g["rules"] if "alert" in r]


def check_alert_test_coverage() -> str:
    """Every alert has a case where it fires and one where it must not."""
    spec = load_yaml(ALERT_RULES)
    tests = load_yaml(ALERT_TESTS)
    require(
        tests.get("rule_files") == [ALERT_RULES.name],
        f"{ALERT_TESTS.name} must load rule_files: [{ALERT_RULES.name}], has {tests.get('rule_files')}",
    )
    fires: set[str] = set()
    quiet: set[str] = set()
    for t in tests.get("tests", []):
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = alert_names(spec)
    unknown = (fires | quiet) - set(alerts)
    require(not unknown, f"{ALERT_TESTS.name} tests alerts the rules do not define: {sorted(unknown)}")
    missing = [f"{a} (fires)" for a in alerts if a not in fires] + [
        f"{a} (stays quiet)" for a in alerts if a not in quiet
    ]
    require(not missing, f"{ALERT_TESTS.name} lacks cases: {', '.join(missing)}")
    return f"{len(alerts)} alerts, each fired and held quiet"


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as plain PromQL: Grafana's interval variables become 5m, the dashboard's
    own variables `__var_<name>__` (so matchers on them can be found)."""
    for v in GRAFANA_INTERVALS:
        expr = expr.replace(v, "5m")
    return re.sub(r"\$\{?([A-Za-z_]\w*)(?::\w+)?\}?", r"__var_\1__", expr)


class Selectors:
    """What a PromQL expression reads: its vector selectors (metric name, matchers) and the labels it
    groups or matches by."""

    def __init__(self) -> None:
        self.selectors: list[tuple[str, list[tuple[str, str, str]]]] = []
        self.grouping: set[str] = set()

    def visit(self, node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = [(m.name, str(m.op).rsplit(".", 1)[-1], m.value) for m in node.matchers.matchers]
            self.selectors.append((node.name or "", matchers))
        elif isinstance(node, promql_parser.MatrixSelector):
            self.visit(node.vector_selector)
        elif isinstance(node, promql_parser.AggregateExpr):
            if node.modifier is not None:
                self.grouping.update(node.modifier.labels)
            self.visit(node.expr)
            if node.param is not None:
                self.visit(node.param)
        elif isinstance(node, promql_parser.BinaryExpr):
            mod = node.modifier
            if mod is not None and mod.matching is not None:
                self.grouping.update(mod.matching.labels)
            self.visit(node.lhs)
            self.visit(node.rhs)
        elif isinstance(node, promql_parser.Call):
            for a in node.args:
                self.visit(a)
        elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
            self.visit(node.expr)


def read_promql(expr: str, where: str) -> Selectors:
    try:
        ast = promql_parser.parse(expr)
    except ValueError as exc:
        raise CheckFailed(f"{where}: not valid PromQL ({exc}): {expr}") from None
    s = Selectors()
    s.visit(ast)
    return s


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable (`label_values(<selector>, label)`
    contributes its selector)."""
    out: list[tuple[str, str]] = []
    for p in dash_panels(dash):
        for t in p.get("targets", []):
            out.append((f"panel '{p.get('title')}' {t.get('refId')}", grafana_to_promql(t.get("expr", ""))))
    for v in dash["templating"]["list"]:
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", q)
        require(m is not None, f"variable {v['name']}: expected label_values(<selector>, <label>), got {q!r}")
        out.append((f"variable {v['name']}", grafana_to_promql(m.group(1))))
        out.append((f"variable {v['name']} label", f"sum by ({m.group(2)}) ({grafana_to_promql(m.group(1))})"))
    return out


def dash_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for p in dash.get("panels", []):
        panels.append(p)
        panels.extend(p.get("panels", []))  # a collapsed row holds its panels
    return panels


def declared_label_names() -> set[str]:
    """Label names the operator and the runtime put on their own series (EncodeLabelSet fields)."""
    out: set[str] = set()
    for path in METRIC_SOURCES:
        src = path.read_text(encoding="utf-8")
        for body in re.findall(r"EncodeLabelSet\)\]\s*pub struct \w+ \{(.*?)\}", src, re.S):
            out |= set(re.findall(r"pub (\w+): String", body))
    return out


def all_exported_metrics() -> set[str]:
    """exported_metrics() and the gauges the operator's admin server appends by hand."""
    admin = (ROOT / "operator" / "src" / "admin.rs").read_text(encoding="utf-8")
    return exported_metrics() | set(re.findall(r"# TYPE (obsrv_[a-z_]+) gauge", admin))


def pod_monitor_target_labels(objects: list[dict[str, Any]]) -> set[str]:
    """Labels the chart's PodMonitor relabels onto connector series, after checking that it selects
    the connector pods by labels they carry, scrapes their named port, and relabels from pod labels
    the operator really sets (crds/src/labels.rs, operator/src/builders.rs)."""
    pms = of_kind(objects, "PodMonitor")
    require(len(pms) == 1, f"expected one PodMonitor, rendered {len(pms)}")
    consts = dict(
        re.findall(r'pub const (\w+): &str = "([^"]+)";', (ROOT / "crds" / "src" / "labels.rs").read_text())
    )
    pod_labels = {
        "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", consts[k]): consts[k]
        for k in ("NAME", "INSTANCE", "CONNECTOR", "DATASET", "SOURCE")
    }
    selector = pms[0]["spec"]["selector"]["matchLabels"]
    want = {consts["NAME"]: consts["APP_NAME"], consts["MANAGED_BY"]: consts["MANAGER"]}
    require(selector == want, f"PodMonitor selects {selector}, connector pods carry {want}")
    builders = (ROOT / "operator" / "src" / "builders.rs").read_text(encoding="utf-8")
    found = re.search(r'pub const HTTP_PORT_NAME: &str = "([^"]+)";', builders)
    require(found is not None, "operator/src/builders.rs: no HTTP_PORT_NAME")
    port = found.group(1) if found else ""
    targets: set[str] = set()
    for ep in pms[0]["spec"]["podMetricsEndpoints"]:
        require(ep.get("port") == port, f"PodMonitor scrapes port {ep.get('port')}, connector pods name theirs {port}")
        for r in ep.get("relabelings", []):
            for src in r.get("sourceLabels", []):
                require(
                    src in pod_labels,
                    f"PodMonitor relabels from {src}, which is no pod label the operator sets "
                    f"(crds/src/labels.rs: {', '.join(sorted(pod_labels.values()))})",
                )
            targets.add(r["targetLabel"])
    return targets


def check_series_use(queries: list[tuple[str, str]], pod_monitor_labels: set[str]) -> str:
    """Every metric a query reads is exported (by the operator, the runtime or an explicitly listed
    outside source), and every label it matches or groups on exists on those series."""
    exported = all_exported_metrics()
    own_labels = declared_label_names()
    connector_labels = own_labels | pod_monitor_labels | SCRAPE_TARGET_LABELS
    operator_labels = own_labels | SCRAPE_TARGET_LABELS
    problems: list[str] = []
    used: set[str] = set()
    for where, expr in queries:
        s = read_promql(expr, where)
        names = {n for n, _ in s.selectors}
        buckets = {"le"} if any(n.endswith("_bucket") for n in names) else set()
        for name, matchers in s.selectors:
            require(name != "", f"{where}: a selector without a metric name: {expr}")
            used.add(name)
            if name not in exported and name not in EXTERNAL_METRICS:
                problems.append(f"{where}: {name} is exported by neither operator/src nor connector-image/src")
            if name.startswith("obsrv_connector_") or name == "up":
                allowed = connector_labels
            elif name.startswith("obsrv_operator_"):
                allowed = operator_labels
            else:
                continue  # kube-state-metrics: its own labels
            if name.endswith("_bucket"):
                allowed = allowed | {"le"}  # a histogram bucket's upper bound
            bad = [m[0] for m in matchers if m[0] not in allowed and m[0] != "__name__"]
            if bad:
                problems.append(f"{where}: {name} has no label(s) {bad}")
        if names and all(n.startswith("obsrv_connector_") for n in names):
            bad = sorted(s.grouping - connector_labels - buckets)
            if bad:
                problems.append(f"{where}: groups by {bad}, which connector series do not carry")
        elif names and all(n.startswith("obsrv_operator_") for n in names):
            bad = sorted(s.grouping - operator_labels - buckets)
            if bad:
                problems.append(f"{where}: groups by {bad}, which operator series do not carry")
    require(not problems, "\n".join(problems))
    return f"{len(used)} metrics: {', '.join(sorted(used))}"


def load_dashboard() -> dict[str, Any]:
    require(DASHBOARD.exists(), f"{DASHBOARD.relative_to(ROOT)} missing")
    try:
        return json.loads(DASHBOARD.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckFailed(f"{DASHBOARD.relative_to(ROOT)} is not JSON: {exc}") from None


def check_dashboard(dash: dict[str, Any]) -> str:
    """What Grafana needs to import it anywhere: a datasource variable every query uses, the
    namespace and connector variables applied to every connector query, unique ids, a layout."""
    for key in ("uid", "title", "schemaVersion", "panels", "templating"):
        require(key in dash, f"dashboard has no {key}")
    require(dash["schemaVersion"] >= 36, f"schemaVersion {dash['schemaVersion']} predates datasource uids")
    require(dash.get("id") is None, "dashboard id must be null (Grafana assigns it on import)")
    require("__inputs" not in dash, "the dashboard uses a datasource variable, not import-time __inputs")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables.get("datasource")
    require(
        ds is not None and ds.get("type") == "datasource" and ds.get("query") == "prometheus",
        "no datasource variable of type prometheus named 'datasource'",
    )
    for name in ("namespace", "connector"):
        v = variables.get(name)
        require(v is not None and v.get("type") == "query", f"no query variable '{name}'")
        require(v.get("datasource", {}).get("uid") == "${datasource}", f"variable {name} ignores $datasource")
        require(v.get("includeAll") and v.get("allValue") == ".*", f"variable {name}: All must mean .*")
    ids: list[int] = []
    titles: list[str] = []
    for p in dash_panels(dash):
        ids.append(p.get("id"))
        gp = p.get("gridPos", {})
        require(all(k in gp for k in "hwxy"), f"panel '{p.get('title')}' has no full gridPos")
        require(gp["x"] + gp["w"] <= 24, f"panel '{p.get('title')}' is wider than the grid")
        if p.get("type") == "row":
            continue
        titles.append(p["title"])
        require(bool(p.get("description")), f"panel '{p['title']}' has no description")
        require(p.get("datasource", {}).get("uid") == "${datasource}", f"panel '{p['title']}' ignores $datasource")
        refs = [t.get("refId") for t in p.get("targets", [])]
        require(refs and len(refs) == len(set(refs)), f"panel '{p['title']}': targets without unique refIds")
        for t in p["targets"]:
            require(t.get("datasource", {}).get("uid") == "${datasource}", f"panel '{p['title']}' target ignores $datasource")
            expr = grafana_to_promql(t.get("expr", ""))
            s = read_promql(expr, f"panel '{p['title']}' {t.get('refId')}")
            for name, matchers in s.selectors:
                scoped = name.startswith("obsrv_connector_") or name in ("up", "kube_pod_labels")
                want = [("namespace", "Re", "__var_namespace__")]
                if scoped:
                    want.append(
                        ("label_obsrv_io_connector" if name == "kube_pod_labels" else "connector", "Re", "__var_connector__")
                    )
                if scoped or name.startswith("kube_"):
                    missing = [w for w in want if w not in matchers]
                    require(
                        not missing,
                        f"panel '{p['title']}': {name} is not filtered by "
                        + ", ".join(f'{w[0]}=~"${w[2][6:-2]}"' for w in missing),
                    )
    require(len(ids) == len(set(ids)), f"panel ids repeat: {sorted(ids)}")
    require(len(titles) == len(set(titles)), "panel titles repeat")
    return f"{len(titles)} panels, variables {', '.join(variables)}"


def check_dashboard_configmap(objects: list[dict[str, Any]], values: dict[str, Any]) -> str:
    d = values["monitoring"]["grafanaDashboard"]
    cms = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    require(bool(cms) == d["enabled"], f"dashboard ConfigMap rendered: {bool(cms)}, values: {d['enabled']}")
    if not cms:
        return "no dashboard ConfigMap"
    cm = cms[0]
    md = cm["metadata"]
    require(md["labels"].get("grafana_dashboard") == "1", "dashboard ConfigMap lacks grafana_dashboard: \"1\"")
    require(
        md["namespace"] == (d["namespace"] or RELEASE_NAMESPACE),
        f"dashboard ConfigMap in {md['namespace']}, values say {d['namespace'] or RELEASE_NAMESPACE}",
    )
    for k, v in d["annotations"].items():
        require(md.get("annotations", {}).get(k) == v, f"annotation {k} missing on the dashboard ConfigMap")
    data = cm.get("data", {})
    require(list(data) == [DASHBOARD.name], f"dashboard ConfigMap keys {list(data)}")
    require(
        json.loads(data[DASHBOARD.name]) == load_dashboard(),
        f"the ConfigMap's JSON differs from {DASHBOARD.relative_to(ROOT)}",
    )
    return f"ConfigMap {md['namespace']}/{md['name']}"


def panel_query(dash: dict[str, Any], reference: str) -> tuple[str, str]:
    """(panel title, PromQL) for `panel: <title>[; ref=X][; namespace=v][; connector=v]`: the panel's
    query as Grafana sends it, with $__rate_interval as 5m and the variables as given (default .*,
    Grafana's "All")."""
    m = re.fullmatch(r"panel: ([^;]+)((?:;\s*\w+=[^;]*)*)", reference.strip())
    require(m is not None, f"{DASHBOARD_TESTS.name}: expr {reference!r} is not 'panel: <title>[; k=v]...'")
    assert m is not None
    title = m.group(1).strip()
    opts = dict(kv.split("=", 1) for kv in re.findall(r";\s*(\w+=[^;]*)", m.group(2)))
    ref = opts.pop("ref", "A").strip()
    panel = next((p for p in dash_panels(dash) if p.get("title") == title), None)
    require(panel is not None, f"{DASHBOARD_TESTS.name}: no panel titled {title!r}")
    assert panel is not None
    target = next((t for t in panel["targets"] if t.get("refId") == ref), None)
    require(target is not None, f"{DASHBOARD_TESTS.name}: panel {title!r} has no target {ref}")
    assert target is not None
    expr = target["expr"]
    for v in GRAFANA_INTERVALS:
        expr = expr.replace(v, "5m")
    for name in ("namespace", "connector"):
        value = opts.pop(name, ".*").strip()
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    require(not opts, f"{DASHBOARD_TESTS.name}: unknown option(s) {sorted(opts)} in {reference!r}")
    left = re.findall(r"\$\{?[A-Za-z_]\w*", expr)
    require(not left, f"panel {title!r} {ref}: variables {left} have no stand-in for promtool")
    return title, expr


def test_dashboard_queries(dash: dict[str, Any]) -> str:
    """promtool test rules on helm/ci/dashboard-tests.yaml with the panels' real queries in place."""
    tests = load_yaml(DASHBOARD_TESTS)
    covered: set[str] = set()
    cases = 0
    for t in tests.get("tests", []):
        for case in t.get("promql_expr_test", []):
            title, case["expr"] = panel_query(dash, case["expr"])
            covered.add(title)
            cases += 1
    panels = [p["title"] for p in dash_panels(dash) if p.get("type") != "row"]
    missing = [p for p in panels if p not in covered]
    require(not missing, f"{DASHBOARD_TESTS.name} has no case for panel(s): {missing}")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / DASHBOARD_TESTS.name).write_text(yaml.safe_dump(tests, sort_keys=False), encoding="utf-8")
        out = run_promtool("test", "rules", DASHBOARD_TESTS.name, cwd=Path(tmp))
    require("SUCCESS" in out, f"promtool test rules did not report SUCCESS:\n{out}")
    return f"{cases} queries of {len(panels)} panels"


def check_monitoring_doc(rules_spec: dict[str, Any], dash: dict[str, Any]) -> str:
    require(MONITORING_DOC.exists(), "docs/monitoring.md missing")
    doc = MONITORING_DOC.read_text(encoding="utf-8")
    panels = [p["title"] for p in dash_panels(dash) if p.get("type") != "row"]
    missing = [a for a in alert_names(rules_spec) if a not in doc] + [p for p in panels if p not in doc]
    require(not missing, f"docs/monitoring.md does not explain: {missing}")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    require("docs/monitoring.md" in readme, "README.md does not link docs/monitoring.md")
    return f"{len(alert_names(rules_spec))} alerts and {len(panels)} panels explained"


def main_monitoring(run: Runner, rendered: dict[str, tuple[list[dict[str, Any]], str, dict[str, Any]]]) -> None:
    """The monitoring checks of main()."""

    def rules_fresh() -> str:
        want = rendered_rules_text()
        have = ALERT_RULES.read_text(encoding="utf-8") if ALERT_RULES.exists() else ""
        require(
            have == want,
            f"{ALERT_RULES.relative_to(ROOT)} is not the rendered PrometheusRule: "
            ".venv/bin/python scripts/check_chart.py --write-rules",
        )
        return f"{len(alert_names(load_yaml(ALERT_RULES)))} alerts"

    run.check("helm/ci/alert-rules.yaml is the chart's rendered PrometheusRule", rules_fresh)

    def check_rules() -> str:
        checked = [ALERT_RULES.relative_to(ROOT).as_posix()]
        run_promtool("check", "rules", checked[0])
        with tempfile.TemporaryDirectory() as tmp:
            for name, (objects, _, _) in rendered.items():
                for pr in of_kind(objects, "PrometheusRule"):
                    path = Path(tmp) / f"{name}.yaml"
                    path.write_text(yaml.safe_dump(pr["spec"]), encoding="utf-8")
                    run_promtool("check", "rules", str(path))
                    checked.append(f"[{name}]")
        return ", ".join(checked)

    run.check("promtool check rules (alert-rules.yaml and every value set's PrometheusRule)", check_rules)

    def test_rules() -> str:
        out = run_promtool("test", "rules", ALERT_TESTS.name, cwd=CI)
        require("SUCCESS" in out, f"promtool test rules did not report SUCCESS:\n{out}")
        return check_alert_test_coverage()

    run.check("promtool test rules helm/ci/alert-tests.yaml", test_rules)

    def tests_can_fail() -> str:
        caught = []
        for label, old, new in [
            ("a lag threshold raised tenfold", "> 10000)", "> 100000)"),
            ("failed records counted as ingested", 'outcome="failed"', 'outcome="ingested"'),
            ("a shorter for: on ObsrvConnectorNotReady", "for: 10m", "for: 1m"),
        ]:
            with tempfile.TemporaryDirectory() as tmp:
                text = ALERT_RULES.read_text(encoding="utf-8")
                require(old in text, f"self-test: {old!r} not in {ALERT_RULES.name}")
                (Path(tmp) / ALERT_RULES.name).write_text(text.replace(old, new, 1), encoding="utf-8")
                shutil.copy(ALERT_TESTS, Path(tmp) / ALERT_TESTS.name)
                try:
                    run_promtool("test", "rules", ALERT_TESTS.name, cwd=Path(tmp))
                except CheckFailed:
                    caught.append(label)
                    continue
                raise CheckFailed(f"helm/ci/alert-tests.yaml still passes with {label}")
        return "; ".join(caught)

    run.check("alert tests catch a changed threshold, selector and for:", tests_can_fail)

    dash: dict[str, Any] = {}

    def dashboard_ok() -> str:
        dash.update(load_dashboard())
        return check_dashboard(dash)

    run.check(f"Grafana dashboard {DASHBOARD.relative_to(ROOT)}", dashboard_ok)

    def dashboard_tests() -> str:
        require(bool(dash), "the dashboard did not load")
        return test_dashboard_queries(dash)

    run.check("promtool test rules helm/ci/dashboard-tests.yaml (every panel's queries)", dashboard_tests)

    def series_used() -> str:
        objects = next(
            (o for o, _, m in rendered.values() if m["monitoring"]["podMonitor"]["enabled"]), None
        )
        require(objects is not None, "no value set renders the PodMonitor")
        queries = dashboard_queries(dash) if dash else []
        spec = load_yaml(ALERT_RULES)
        queries += [(f"alert {r['alert']}", r["expr"]) for g in spec["groups"] for r in g["rules"]]
        return check_series_use(queries, pod_monitor_target_labels(objects))

    run.check("dashboard and alerts read only exported series, by labels those series carry", series_used)

    def labels_check_can_fail() -> None:
        objects = next(o for o, _, m in rendered.values() if m["monitoring"]["podMonitor"]["enabled"])
        labels = pod_monitor_target_labels(objects)
        for label, expr in [
            ("an unknown metric", "rate(obsrv_connector_record_total[5m])"),
            ("a label no series has", 'obsrv_connector_lag_records{tenant="a"}'),
            ("grouping by a label no series has", "sum by (dataset_id) (obsrv_connector_lag_records)"),
        ]:
            try:
                check_series_use([("self-test", expr)], labels)
            except CheckFailed:
                continue
            raise CheckFailed(f"the series check accepted {label}")

    run.check("series check catches an unknown metric and unknown labels", labels_check_can_fail)

    def doc_ok() -> str:
        return check_monitoring_doc(load_yaml(ALERT_RULES), dash or load_dashboard())

    run.check("docs/monitoring.md explains every alert and panel; README links it", doc_ok)


# ---------------------------------------------------------------------------------------------------
# Examples


def example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES.glob("*.yaml"))


def check_example(path: Path, validator: jsonschema.protocols.Validator) -> str:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    connectors = [d for d in docs if d.get("kind") == "Connector"]
    require(len(connectors) >= 1, f"{path.name}: no Connector")
    kinds = []
    for d in docs:
        if d.get("kind") == "Connector":
            errs = schema_errors(validator, d)
            require(
                not errs,
                f"{path.name}: Connector {d['metadata'].get('name')} does not match the CRD schema:\n"
                + "\n".join(errs),
            )
        else:
            validate_k8s(d)
    for conn in connectors:
        src = conn["spec"]["source"]
        require(len(src) == 1, f"{path.name}: {conn['metadata']['name']} must set exactly one source kind")
        kinds.append(next(iter(src)))
        # The Secrets and keys each Connector references are checked by crds/tests/crd.rs, with
        # the same registry the operator uses (no per-kind list here).
    return ", ".join(kinds)


# ---------------------------------------------------------------------------------------------------
# Argo CD health check


ARGOCD_ACTIONS = [("pause", "Paused"), ("resume", "Running"), ("stop", "Stopped")]


def lua_to_py(value: Any) -> Any:
    if lua51.lua_type(value) == "table":
        d = {k: lua_to_py(v) for k, v in value.items()}
        if d and all(isinstance(k, int) for k in d) and sorted(d) == list(range(1, len(d) + 1)):
            return [d[i] for i in range(1, len(d) + 1)]
        return d
    return value


def kstatus(obj: dict[str, Any]) -> str:
    """The status kstatus (sigs.k8s.io/cli-utils/pkg/kstatus) computes for a custom resource:
    Terminating while deleted; InProgress while its status is of an older generation or a
    Reconciling condition is True; Failed when a Stalled condition is True; Current otherwise."""
    meta = obj.get("metadata", {})
    status = obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    observed = status.get("observedGeneration")
    if observed is not None and observed != meta.get("generation"):
        return "InProgress"
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    if conditions.get("Reconciling", {}).get("status") == "True":
        return "InProgress"
    if conditions.get("Stalled", {}).get("status") == "True":
        return "Failed"
    return "Current"


def argocd_run(script: str, obj: dict[str, Any]) -> Any:
    """Run an Argo CD Lua script (health check or resource action) the way Argo CD does: the live
    object in the global `obj`, the script's return value as the result."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    return lua_to_py(lua.execute(script))


def argocd_health(script: str, obj: dict[str, Any]) -> dict[str, Any]:
    return argocd_run(script, obj)


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    os.chdir(ROOT)
    run = Runner()
    print(
        f"checking {CHART.relative_to(ROOT)} with Helm {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}), "
        f"kubernetes-validate {kubernetes_validate.__version__} strict for Kubernetes {KUBE_VERSION}"
    )

    def crds_in_sync() -> str:
        chart_crd = CHART / "crds" / "connector.yaml"
        require(
            chart_crd.exists(), f"{chart_crd} missing: cp crds/connector.yaml {chart_crd.relative_to(ROOT)}"
        )
        require(
            chart_crd.read_bytes() == CRD_FILE.read_bytes(),
            f"{chart_crd.relative_to(ROOT)} differs from crds/connector.yaml: cp crds/connector.yaml {chart_crd.relative_to(ROOT)}",
        )
        with helm.Chart.load(CHART) as chart:
            names = [c["name"] for c in chart.crds]
        require(names, "Helm loads no CRD from the chart's crds/")
        crd = load_yaml(CRD_FILE)
        validate_k8s(crd)
        return f"{crd['metadata']['name']}, loaded by Helm as {names}"

    run.check("chart crds/ is identical to crds/connector.yaml and valid", crds_in_sync)

    sets = value_sets()
    rendered: dict[str, tuple[list[dict[str, Any]], str, dict[str, Any]]] = {}
    for name, values in sets:

        def lint(values: dict[str, Any] = values) -> str:
            report = helm.lint(
                CHART, values, strict=True, namespace=RELEASE_NAMESPACE, kube_version=f"v{KUBE_VERSION}"
            )
            bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + [
                {"error": e} for e in report.get("errors") or []
            ]
            require(
                not bad,
                "helm lint --strict:\n" + "\n".join(f"{m.get('path', '')}: {m['error']}" for m in bad),
            )
            return f"{len(report.get('messages', []))} info message(s)"

        run.check(f"[{name}] helm lint --strict", lint)

        def do_render(name: str = name, values: dict[str, Any] = values) -> str:
            rendered[name] = render(values)
            objs = rendered[name][0]
            return f"{len(objs)} objects: " + ", ".join(sorted({o["kind"] for o in objs}))

        run.check(f"[{name}] renders with the Helm engine", do_render)
        if name not in rendered:
            continue
        objects, notes, merged = rendered[name]

        def validate_all(objects: list[dict[str, Any]] = objects) -> str:
            problems = []
            for o in objects:
                try:
                    validate_k8s(o)
                except CheckFailed as exc:
                    problems.append(str(exc))
            require(not problems, "\n".join(problems))
            return f"{len(objects)} objects valid"

        run.check(f"[{name}] every object validates (strict, Kubernetes {KUBE_VERSION})", validate_all)
        run.check(
            f"[{name}] operator Deployment: restricted security, flags follow values",
            lambda o=objects, m=merged: check_deployment(o, m),
        )
        run.check(
            f"[{name}] monitoring objects and alert expressions",
            lambda o=objects, m=merged: check_monitoring(o, m),
        )
        run.check(
            f"[{name}] Grafana dashboard ConfigMap follows values",
            lambda o=objects, m=merged: check_dashboard_configmap(o, m),
        )

        def no_secrets(objects: list[dict[str, Any]] = objects) -> None:
            found = secret_findings(objects)
            require(not found, "\n".join(found))

        run.check(f"[{name}] no rendered object holds a secret value", no_secrets)

        def notes_ok(notes: str = notes, merged: dict[str, Any] = merged) -> None:
            require(
                "kubectl" in notes and "Connector" in notes,
                "NOTES.txt does not tell the user what to do next",
            )
            for ns in merged["watch"]["namespaces"]:
                require(ns in notes, f"NOTES.txt does not name watched namespace {ns}")

        run.check(f"[{name}] NOTES.txt tells what to do next", notes_ok)

    main_monitoring(run, rendered)

    declared: list[dict[str, Any]] = []

    def get_declared() -> str:
        declared.extend(declared_rbac())
        return f"{len(triples(declared))} permissions from `obsrv-operator print-rbac`"

    run.check("operator declares its RBAC (cargo run -q -p obsrv-operator -- print-rbac)", get_declared)
    if declared:
        decl = triples(declared)

        def chart_copy() -> None:
            copy_rules = json.loads((CHART / "files" / "rbac-rules.json").read_text(encoding="utf-8"))
            compare_rbac(
                decl,
                triples(copy_rules),
                "helm/obsrv-connectors/files/rbac-rules.json "
                "(refresh: cargo run -q -p obsrv-operator -- print-rbac > helm/obsrv-connectors/files/rbac-rules.json)",
            )

        run.check("chart's files/rbac-rules.json equals print-rbac", chart_copy)
        for name, (objects, _, merged) in rendered.items():
            run.check(
                f"[{name}] RBAC grants exactly what the operator declares",
                lambda o=objects, m=merged: check_rbac(o, m, decl),
            )

        def rbac_check_can_fail() -> None:
            objects, _, merged = rendered["default"]
            for label, mutated in [
                ("a missing permission", decl - {sorted(decl)[0]}),
                ("an extra permission", decl | {("", "secrets", "delete")}),
            ]:
                try:
                    check_rbac(objects, merged, mutated)
                except CheckFailed:
                    continue
                raise CheckFailed(f"the RBAC comparison did not notice {label}")

        if "default" in rendered:
            run.check("RBAC comparison catches a missing and an extra permission", rbac_check_can_fail)

    def flags_known() -> str:
        help_text = operator_help()
        for objects, _, _ in rendered.values():
            check_flags_known(objects, help_text)
        return f"checked against `obsrv-operator --help` for {len(rendered)} value sets"

    run.check("every flag the chart passes is known to obsrv-operator", flags_known)

    def validation_can_fail() -> str:
        objects, _, _ = rendered["default"]
        dep = copy.deepcopy(operator_deployment(objects))
        dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] = True
        caught = []
        for label, obj in [("an unknown field", dep)]:
            try:
                validate_k8s(obj)
            except CheckFailed as exc:
                caught.append(f"{label}: {str(exc).split(': ', 1)[1]}")
                continue
            raise CheckFailed(f"kubernetes-validate (strict) accepted {label}")
        return "; ".join(caught)

    if "default" in rendered:
        run.check("strict validation catches an unknown field in a rendered object", validation_can_fail)

    def broken_template_caught() -> str:
        with tempfile.TemporaryDirectory() as tmp:
            broken = Path(tmp) / CHART.name
            shutil.copytree(CHART, broken)
            dep = broken / "templates" / "deployment.yaml"
            dep.write_text(
                dep.read_text(encoding="utf-8").replace("{{ .Values.replicas }}", "{{ .Values.replicas"),
                encoding="utf-8",
            )
            report = helm.lint(
                broken, {}, strict=True, namespace=RELEASE_NAMESPACE, kube_version=f"v{KUBE_VERSION}"
            )
            errors = [m for m in report.get("messages", []) if m.get("severity", 0) >= 3] + list(
                report.get("errors") or []
            )
            require(errors, "helm lint did not report a template with an unclosed action")
            with helm.Chart.load(broken) as chart:
                try:
                    chart.render({}, name=RELEASE, namespace=RELEASE_NAMESPACE)
                except helm.HelmError:
                    return "lint and render both fail"
            raise CheckFailed("the Helm engine rendered a template with an unclosed action")

    run.check("a broken template fails lint and render", broken_template_caught)

    def bad_secret_caught() -> str:
        objects, _, _ = render(load_yaml(CI / "bad-values-secret-env.yaml"))
        found = secret_findings(objects)
        require(
            any("OBSRV_SINK_PASSWORD" in f for f in found),
            "a literal OBSRV_SINK_PASSWORD in the operator's env went unnoticed",
        )
        require(
            any("sink-url" in f for f in found), "a user:password@ URL in a pod annotation went unnoticed"
        )
        return f"{len(found)} findings"

    run.check("secret detector catches helm/ci/bad-values-secret-env.yaml", bad_secret_caught)

    def bad_schema_rejected() -> str:
        cases = load_yaml(CI / "bad-values-schema.yaml")
        with helm.Chart.load(CHART) as chart:
            for case in cases:
                try:
                    chart.validate_schema(case)
                except helm.HelmValuesError:
                    continue
                raise CheckFailed(f"values.schema.json accepted bad values {case}")
        return f"{len(cases)} bad value sets rejected"

    run.check("values.schema.json rejects bad values", bad_schema_rejected)

    validator = connector_validator()
    files = example_files()
    seen_kinds: list[str] = []
    for path in files:

        def one(path: Path = path) -> str:
            kinds = check_example(path, validator)
            seen_kinds.extend(kinds.split(", "))
            return kinds

        run.check(f"example {path.relative_to(ROOT)} is valid against the CRD", one)

    def all_kinds() -> None:
        missing = [k for k in SOURCE_KINDS if k not in seen_kinds]
        require(not missing, f"examples/ lacks a Connector for source kind(s): {missing}")
        readme = EXAMPLES / "README.md"
        require(readme.exists(), "examples/README.md missing")
        text = readme.read_text(encoding="utf-8")
        for p in files:
            require(p.name in text, f"examples/README.md does not mention {p.name}")

    run.check("examples/ cover every source kind and the README lists them", all_kinds)

    def strict_schema_can_fail() -> None:
        good = next(
            d
            for d in yaml.safe_load_all((files[0]).read_text(encoding="utf-8"))
            if d and d.get("kind") == "Connector"
        )
        bad = copy.deepcopy(good)
        bad["spec"]["sourceTypo"] = True
        require(schema_errors(validator, bad), "the Connector schema check accepted an unknown field")

    if files:
        run.check("Connector schema check rejects an unknown field", strict_schema_can_fail)

    script = (CHART / "files" / "argocd-health.lua").read_text(encoding="utf-8")
    fixtures = load_yaml(CI / "argocd-health-fixtures.yaml")
    expected_statuses = {f["expect"] for f in fixtures}
    for fx in fixtures:

        def health(fx: dict[str, Any] = fx) -> str:
            errs = schema_errors(validator, fx["object"])
            require(not errs, "fixture does not match the CRD schema:\n" + "\n".join(errs))
            hs = argocd_health(script, fx["object"])
            require(hs.get("status") == fx["expect"], f"expected {fx['expect']}, Lua returned {hs}")
            require(bool(hs.get("message")), f"no message: {hs}")
            ks = kstatus(fx["object"])
            require(ks == fx["kstatus"], f"expected kstatus {fx['kstatus']}, got {ks}")
            return hs["message"]

        run.check(f"argocd health / kstatus: {fx['name']} -> {fx['expect']} / {fx['kstatus']}", health)

    def all_statuses() -> None:
        missing = {"Healthy", "Progressing", "Degraded", "Suspended"} - expected_statuses
        require(not missing, f"no Argo CD fixture for {sorted(missing)}")
        verdicts = {f["kstatus"] for f in fixtures}
        missing = {"Current", "InProgress", "Failed"} - verdicts
        require(not missing, f"no kstatus fixture for {sorted(missing)}")

    run.check("argocd health fixtures cover Healthy, Progressing, Degraded, Suspended", all_statuses)

    def lua_blocks(doc: str) -> set[str]:
        """Every `<name>.lua: |` block of the doc's YAML snippets, dedented."""
        blocks: set[str] = set()
        lines = doc.split("\n")
        for i, line in enumerate(lines):
            if not re.search(r"\.lua: \|$", line):
                continue
            indent = len(line) - len(line.lstrip())
            body = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                body.append(nxt)
            blocks.add(textwrap.dedent("\n".join(body)).strip())
        return blocks

    def docs_embed_lua() -> str:
        doc_path = ROOT / "docs" / "gitops.md"
        require(doc_path.exists(), "docs/gitops.md missing")
        blocks = lua_blocks(doc_path.read_text(encoding="utf-8"))
        scripts = sorted((CHART / "files").glob("argocd-*.lua"))
        differ = [p.name for p in scripts if p.read_text(encoding="utf-8").strip() not in blocks]
        require(
            not differ,
            f"docs/gitops.md does not carry these tested scripts verbatim (copy them into the doc): {differ}",
        )
        return f"{len(scripts)} scripts"

    run.check("docs/gitops.md carries the tested Lua verbatim", docs_embed_lua)

    discovery = (CHART / "files" / "argocd-actions-discovery.lua").read_text(encoding="utf-8")
    actions = {
        name: (CHART / "files" / f"argocd-action-{name}.lua").read_text(encoding="utf-8")
        for name, _ in ARGOCD_ACTIONS
    }

    def act() -> str:
        seen = []
        for fx in fixtures:
            state = (fx["object"].get("spec") or {}).get("state", "Running")
            where = f"fixture '{fx['name']}' (spec.state {state})"
            offered = argocd_run(discovery, fx["object"])
            require(
                set(offered) == {n for n, _ in ARGOCD_ACTIONS}, f"{where}: discovery offers {sorted(offered)}"
            )
            for name, target in ARGOCD_ACTIONS:
                disabled = bool(offered[name].get("disabled"))
                require(disabled == (state == target), f"{where}: action {name} disabled={disabled}")
                after = argocd_run(actions[name], copy.deepcopy(fx["object"]))
                require(
                    after["spec"]["state"] == target,
                    f"{where}: action {name} left spec.state {after['spec'].get('state')}",
                )
                errs = schema_errors(validator, after)
                require(
                    not errs, f"{where}: action {name} produced an invalid Connector:\n" + "\n".join(errs)
                )
                rest = {k: v for k, v in after["spec"].items() if k != "state"}
                require(
                    rest == {k: v for k, v in fx["object"]["spec"].items() if k != "state"},
                    f"{where}: action {name} changed more than spec.state",
                )
            seen.append(state)
        return f"{len(fixtures)} fixtures, states {', '.join(sorted(set(seen)))}"

    run.check("argocd actions pause/resume/stop: offered by state, set only spec.state", act)

    if run.failures:
        print("\nfailed checks:\n  " + "\n  ".join(run.failures))
    print(f"{run.passed} passed, {run.failed} failed")
    return 1 if run.failed else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-rules"]:
        os.chdir(ROOT)
        sys.exit(write_rules())
    require(not sys.argv[1:], f"usage: {sys.argv[0]} [--write-rules]")
    sys.exit(main())
