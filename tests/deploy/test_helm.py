"""The Helm chart, rendered by Helm's own engine (helm-python-sdk embeds the Helm library, so no
`helm` binary is needed) and the manifests validated against Kubernetes' schemas
(kubernetes-validate).

Covered: `helm lint --strict`; values.schema.json against good and bad values (Helm applies it on
install); rendering with the defaults and with every option on; every rendered object valid for
Kubernetes 1.30; the rollout checksum, probes, preStop sleep and a termination grace longer than
sleep + drain; hardened security context; secrets only referenced; Ingress set up for streams;
every value read by a template and documented by a comment. Not covered: installing into a
cluster (admission, the image actually starting).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python import chart as helm
from helm_python.errors import HelmError

CHART = Path(__file__).resolve().parents[2] / "helm" / "channels-gateway"
KUBERNETES = "1.30.0"
VALUES_REF = re.compile(r"\$?\.Values((?:\.[A-Za-z_]\w*)+)")

EVERYTHING_ON: dict[str, Any] = {
    "autoscaling": {"enabled": True},
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt"},
        "tls": [{"secretName": "gateway-tls", "hosts": ["gateway.example.com"]}],
    },
    "gateway": {
        "extraEnv": {"GATEWAY_CHANNELS": "chat.*,jobs"},
        "secretEnv": {
            "GATEWAY_JWT_SECRET": {"name": "gateway-auth", "key": "jwt-secret"},
            "GATEWAY_LAYER": {"name": "gateway-broker", "key": "url"},
        },
        "existingSecret": "gateway-extra",
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "podAnnotations": {"example.com/team": "realtime"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
}


def defaults() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded


def merged(overrides: dict[str, Any]) -> dict[str, Any]:
    def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value
        return base

    return merge(copy.deepcopy(defaults()), overrides)


def render(overrides: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The rendered objects by kind (one of each kind here)."""
    manifests = helm.Chart.load(CHART).render(
        values=overrides or {}, name="gw", namespace="realtime", is_install=True
    )
    objects: dict[str, dict[str, Any]] = {}
    for path, text in manifests.items():
        if path.endswith(".yaml"):
            for document in yaml.safe_load_all(text):
                if document:
                    assert document["kind"] not in objects, document["kind"]
                    objects[document["kind"]] = document
    return objects


def test_helm_lint_strict_passes() -> None:
    for values in ({}, EVERYTHING_ON):
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBERNETES}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, report


@pytest.mark.parametrize("values", [{}, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_rendered_manifests_are_valid_kubernetes(values: dict[str, Any]) -> None:
    objects = render(values)
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget"} <= set(
        objects
    )
    for kind, document in objects.items():
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
        assert document["metadata"]["name"] == "gw-channels-gateway", kind
    assert "Secret" not in objects
    assert ("Ingress" in objects, "HorizontalPodAutoscaler" in objects) == (
        bool(values),
        bool(values),
    )


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
    chart = helm.Chart.load(CHART)
    chart.validate_schema(defaults())
    with pytest.raises(HelmError):
        chart.validate_schema(merged({change[0]: {change[1]: value}}))


def test_pods_drain_before_they_are_killed() -> None:
    values = merged({"preStopSleepSeconds": 7, "gateway": {"shutdownGraceSeconds": 12.5}})
    pod = render(values)["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    assert pod["terminationGracePeriodSeconds"] > 7 + 12.5
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_config_change_rolls_the_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        template = render(values)["Deployment"]["spec"]["template"]
        value: str = template["metadata"]["annotations"]["checksum/config"]
        return value

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"gateway": {"workers": 3}})


def test_settings_and_secrets_reach_the_container() -> None:
    objects = render(EVERYTHING_ON)
    config = objects["ConfigMap"]["data"]
    assert config["GATEWAY_LAYER"] == "redis+streams://redis-master:6379/0"
    assert config["GATEWAY_CHANNELS"] == "chat.*,jobs"
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"]}
    assert env["GATEWAY_JWT_SECRET"] == {"name": "gateway-auth", "key": "jwt-secret"}
    assert env["GATEWAY_LAYER"] == {"name": "gateway-broker", "key": "url"}  # wins over the map
    assert {"secretRef": {"name": "gateway-extra"}} in container["envFrom"]
    assert "replicas" not in objects["Deployment"]["spec"]  # the HPA owns the count


def test_an_existing_nats_cluster_is_configured_by_its_seed_list() -> None:
    layer = "nats://nats-0.nats:4222,nats-1.nats:4222,nats-2.nats:4222?replicas=3"
    values = merged({"gateway": {"layer": layer}})
    helm.Chart.load(CHART).validate_schema(values)
    assert render({"gateway": {"layer": layer}})["ConfigMap"]["data"]["GATEWAY_LAYER"] == layer
    notes = helm.Chart.load(CHART).render(
        values={"gateway": {"layer": layer}}, name="gw", namespace="realtime", is_install=True
    )
    text = next(text for path, text in notes.items() if path.endswith("NOTES.txt"))
    assert "on nats://" in text and "?replicas=3" in text
    assert "nats-0.nats:4222" in (CHART / "values.yaml").read_text()


def test_pods_are_hardened() -> None:
    objects = render()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_ingress_is_set_up_for_streams() -> None:
    annotations = render(EVERYTHING_ON)["Ingress"]["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"


def test_single_pod_gets_no_disruption_budget() -> None:
    assert "PodDisruptionBudget" not in render({"replicaCount": 1})


def paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for key, value in tree.items():
        found.append((*prefix, key))
        if isinstance(value, dict):
            found += paths(value, (*prefix, key))
    return found


def test_every_value_is_read_by_a_template() -> None:
    text = "\n".join(path.read_text() for path in (CHART / "templates").iterdir())
    used = {tuple(match.split(".")[1:]) for match in VALUES_REF.findall(text)}
    for path in paths(defaults()):
        read = any(path[: len(ref)] == ref or ref[: len(path)] == path for ref in used)
        assert read, f"{'.'.join(path)} is never read"


def test_every_value_is_commented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*(- )?[A-Za-z]\w*:", line):
            above = lines[number - 1].strip()
            assert above.startswith("#"), f"values.yaml:{number + 1} {line.strip()} has no comment"
