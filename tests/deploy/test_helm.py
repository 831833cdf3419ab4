"""The Helm chart, checked without a `helm` binary (none is installable on this machine).

What these tests cover: Chart.yaml and values.yaml parse; the default values pass the chart's
values.schema.json (which Helm itself applies on install); every `.Values` path a template reads
exists, and every value is read by some template and documented by a comment; every `include`
names a defined helper; template blocks are balanced; the Deployment carries the rollout
checksum, probes, preStop sleep, derived termination grace and hardened security context; no
Secret is created (secrets are referenced only). What they cannot cover: rendering the templates
and validating the rendered manifests against Kubernetes' schemas (`helm lint`/`helm template`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "channels-gateway"
TEMPLATES = sorted((CHART / "templates").glob("*"))
VALUES_REF = re.compile(r"\$?\.Values((?:\.[A-Za-z_]\w*)+)")


def values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((CHART / "values.schema.json").read_bytes())
    return loaded


def template_text() -> str:
    return "\n".join(path.read_text() for path in TEMPLATES)


def paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a mapping, parents before children."""
    found = []
    for key, value in tree.items():
        found.append((*prefix, key))
        if isinstance(value, dict):
            found += paths(value, (*prefix, key))
    return found


def referenced() -> set[tuple[str, ...]]:
    return {tuple(match.split(".")[1:]) for match in VALUES_REF.findall(template_text())}


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == CHART.name
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["appVersion"]
    assert {path.name for path in TEMPLATES} >= {
        "_helpers.tpl",
        "deployment.yaml",
        "service.yaml",
        "configmap.yaml",
        "ingress.yaml",
        "hpa.yaml",
        "pdb.yaml",
        "serviceaccount.yaml",
        "NOTES.txt",
    }


def test_default_values_pass_the_schema() -> None:
    jsonschema.Draft7Validator.check_schema(schema())
    jsonschema.validate(values(), schema())


@pytest.mark.parametrize(
    ("change", "value"),
    [
        (("gateway", "layer"), "redis://:hunter2@redis:6379/0"),  # a password belongs in a Secret
        (("gateway", "layer"), "kafka://broker:9092"),
        (("gateway", "workers"), 0),
        (("gateway", "secretEnv"), {"GATEWAY_JWT_SECRET": "inline-secret"}),
        (("gateway", "unknown"), 1),
    ],
)
def test_schema_refuses_bad_values(change: tuple[str, ...], value: Any) -> None:
    changed = values()
    changed[change[0]][change[1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(changed, schema())


def test_every_values_reference_exists() -> None:
    defaults = values()
    for path in referenced():
        node: Any = defaults
        for key in path:
            assert isinstance(node, dict) and key in node, f".Values.{'.'.join(path)} is not set"
            node = node[key]


def test_every_value_is_used() -> None:
    used = referenced()
    for path in paths(values()):
        read = any(path[: len(ref)] == ref or ref[: len(path)] == path for ref in used)
        assert read, f"{'.'.join(path)} is never read"


def test_every_value_is_commented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*(- )?[A-Za-z]\w*:", line):
            above = lines[number - 1].strip()
            assert above.startswith("#"), f"values.yaml:{number + 1} {line.strip()} has no comment"


def test_includes_are_defined() -> None:
    text = template_text()
    defined = set(re.findall(r'define "([^"]+)"', text))
    included = set(re.findall(r'include "([^"]+)"', text))
    assert included <= defined, included - defined


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda path: path.name)
def test_template_blocks_are_balanced(template: Path) -> None:
    text = template.read_text()
    opened = len(re.findall(r"\{\{-?\s*(?:if|range|with|define)\b", text))
    closed = len(re.findall(r"\{\{-?\s*end\s*-?\}\}", text))
    assert opened == closed
    assert text.count("{{") == text.count("}}")


def test_deployment_drains_before_it_is_killed() -> None:
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml")' in (
        deployment
    )
    assert re.search(r"readinessProbe:\s+httpGet:\s+path: /readyz", deployment)
    assert re.search(r"livenessProbe:\s+httpGet:\s+path: /healthz", deployment)
    assert 'command: ["sleep", "{{ .Values.preStopSleepSeconds }}"]' in deployment
    assert 'terminationGracePeriodSeconds: {{ include "channels-gateway.terminationGrace" . }}' in (
        deployment
    )
    # grace = preStop sleep + drain + margin: always longer than the two together
    assert "add .Values.preStopSleepSeconds (ceil .Values.gateway.shutdownGraceSeconds) 15" in (
        helpers
    )


def test_pods_are_hardened_and_secrets_only_referenced() -> None:
    defaults = values()
    assert defaults["podSecurityContext"]["runAsNonRoot"] is True
    assert defaults["podSecurityContext"]["runAsUser"] != 0
    assert defaults["securityContext"]["readOnlyRootFilesystem"] is True
    assert defaults["securityContext"]["allowPrivilegeEscalation"] is False
    assert defaults["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert defaults["serviceAccount"]["automount"] is False
    assert "kind: Secret" not in template_text()
    assert "secretKeyRef:" in template_text()


def test_ingress_is_set_up_for_streams() -> None:
    ingress = (CHART / "templates" / "ingress.yaml").read_text()
    assert 'nginx.ingress.kubernetes.io/proxy-buffering: "off"' in ingress
    assert 'nginx.ingress.kubernetes.io/proxy-read-timeout: "3600"' in ingress
