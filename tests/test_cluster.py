"""The cluster definitions in cluster/: Ray's own schema and config preparation (no cloud calls), the
fields KubeRay requires, and that no rule opens Ray's ports to the internet."""

import copy
import ipaddress
import json
from pathlib import Path

import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO

LAUNCHERS = ["aws.yaml", "gcp.yaml", "azure.yaml"]
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard / job API, Ray client


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / "cluster" / name).read_text())


def _with_docker(name: str) -> dict:
    """The launcher YAML with its commented-out docker block switched on."""
    lines = (REPO / "cluster" / name).read_text().splitlines()
    start = lines.index("# docker:")
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("#   "):
            break
        block.append(line)
    enabled = [line[2:] for line in block]
    text = "\n".join(lines[:start] + enabled + lines[start + len(block):])
    return yaml.safe_load(text)


@pytest.mark.parametrize("name", LAUNCHERS)
@pytest.mark.parametrize("docker", [False, True])
def test_launcher_yaml_passes_rays_schema_and_preparation(name, docker):
    config = _with_docker(name) if docker else _load(name)
    prepared = prepare_config(copy.deepcopy(config))  # merges the provider's defaults, like `ray up`
    validate_config(prepared)  # ray/autoscaler/ray-schema.json plus Ray's own cross-field checks
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # drivers only: training goes to GPU workers
    workers = {k: v for k, v in types.items() if k != prepared["head_node_type"]}
    assert workers and all(v["min_workers"] == 0 and v["max_workers"] >= 1 for v in workers.values())
    spot = json.dumps(workers).lower()
    assert "spot" in spot or "preemptible" in spot
    assert "bash scripts/setup.sh" in " ".join(prepared["setup_commands"])  # installed as the README does
    assert prepared["file_mounts"] == {"/home/ubuntu/lmfleet": "."}
    assert (prepared["docker"].get("image") is not None) == docker


def _public(cidr: str) -> bool:
    return cidr in ("*", "Internet", "Any") or ipaddress.ip_network(cidr).prefixlen == 0


def test_no_rule_opens_rays_ports_to_the_internet():
    aws = _load("aws.yaml")["provider"]["security_group"]["IpPermissions"]
    for rule in aws:
        ports = set(range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1)) if rule["IpProtocol"] != "-1" \
            else set(range(65536))
        public = any(_public(r["CidrIp"]) for r in rule.get("IpRanges", [])) or \
            any(_public(r["CidrIpv6"]) for r in rule.get("Ipv6Ranges", []))
        assert not (public and ports & RAY_PORTS), rule
    # Azure: the launcher's own deployment template creates the security group; it must allow SSH only.
    template = json.loads((Path(ray.autoscaler.__file__).parent / "_private" / "_azure" /
                           "azure-config-template.json").read_text())
    rules = [r for res in template["resources"] for r in res.get("properties", {}).get("securityRules", [])]
    assert rules and all(r["properties"]["destinationPortRange"] == "22" for r in rules
                         if r["properties"]["direction"] == "Inbound" and r["properties"]["access"] == "Allow")
    # GCP: the nodes sit on the dedicated VPC whose firewall rules the YAML's header creates (SSH from
    # one address, everything else only between the VPC's own nodes).
    gcp = _load("gcp.yaml")
    header = (REPO / "cluster" / "gcp.yaml").read_text().split("cluster_name:")[0]
    assert "--allow=tcp:22 --source-ranges=YOUR.IP/32" in header and "0.0.0.0/0" not in header
    for name, node in gcp["available_node_types"].items():
        (nic,) = node["node_config"]["networkInterfaces"]
        assert nic["network"] == "global/networks/lmfleet", name
    # Dashboards are bound inside the cluster network and reached through an SSH tunnel / port-forward.
    for name in LAUNCHERS:
        assert "ray dashboard cluster/" in (REPO / "cluster" / name).read_text()


def _kuberay() -> list[dict]:
    return list(yaml.safe_load_all((REPO / "cluster" / "kuberay.yaml").read_text()))


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # never a LoadBalancer / NodePort exposing 8265 / 6379
    assert "rayStartParams" in head and head["template"]["spec"]["containers"][0]["image"]
    for group in spec["workerGroupSpecs"]:
        assert {"groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"} <= set(group)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]


def test_kuberay_manifests_have_the_fields_kuberay_requires():
    docs = {d["kind"]: d for d in _kuberay()}
    assert set(docs) == {"RayCluster", "RayJob", "PersistentVolumeClaim"}
    for doc in docs.values():
        assert doc["apiVersion"] and doc["metadata"]["name"]
    assert docs["RayCluster"]["apiVersion"] == docs["RayJob"]["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(docs["RayCluster"]["spec"])
    job = docs["RayJob"]["spec"]
    _check_cluster_spec(job["rayClusterSpec"])
    assert job["entrypoint"].startswith("lmfleet run jobs/") and job["shutdownAfterJobFinishes"] is True
    config = job["entrypoint"].split()[2]
    assert (REPO / config).is_file()  # the RayJob runs a config this repo has
    assert not any("Secret" in json.dumps(d) or "password" in json.dumps(d).lower() for d in docs.values())
