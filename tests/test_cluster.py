"""Cluster configs in cluster/: Ray's own schema, nothing open to the internet, token auth on,
credentials from roles only, entrypoints that exist; and the dataset staging script."""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from fgray.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY_PORTS = (6379, 8265, 10001)


def _load(name: str):
    """cluster/ holds scripts, not a package: load one by path."""
    spec = importlib.util.spec_from_file_location(f"fgray_cluster_{name}", CLUSTER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


check = _load("check_configs")
stage_data = _load("stage_data")


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def _ray_up_files() -> list[Path]:
    return [p for p in _yaml_files()
            if any(check.is_ray_up_config(d) for d in check.load_documents(p))]


def _kuberay_files() -> list[Path]:
    return [p for p in _yaml_files()
            if any(check.is_kuberay(d) for d in check.load_documents(p))]


def _installed_ray_schema() -> dict:
    # Found independently of check_configs.ray_schema, through the package's resources.
    ref = importlib.resources.files("ray") / "autoscaler" / "ray-schema.json"
    return json.loads(ref.read_text(encoding="utf-8"))


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


# --------------------------------------------------------------------------- ray up configs

def test_both_clouds_have_a_ray_up_config():
    assert {p.name for p in _ray_up_files()} >= {"aws-gpu.yaml", "gcp-gpu.yaml"}


@pytest.mark.parametrize("path", _ray_up_files(), ids=lambda p: p.name)
def test_ray_up_config_validates_against_installed_ray_schema(path):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, _installed_ray_schema())
    assert check.schema_errors(config) == []
    # Ray's own loader adds cross-field checks (head type exists, worker bounds) on top.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_schema_check_reports_what_is_wrong():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    config["max_workers"] = "eight"
    config["dashboard_port"] = 8265
    errors = check.schema_errors(config)
    assert any(e.startswith("max_workers:") and "'eight'" in e for e in errors)
    assert any("dashboard_port" in e for e in errors)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _installed_ray_schema())


@pytest.mark.parametrize("path", _ray_up_files(), ids=lambda p: p.name)
def test_ray_up_cluster_is_a_cpu_head_with_autoscaling_gpu_workers(path):
    config = yaml.safe_load(path.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no trial lands on the head
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    machine = {k: v["node_config"].get("InstanceType") or v["node_config"]["machineType"]
               for k, v in workers.items()}
    gpu_families = ("g5.", "p4d.") if config["provider"]["type"] == "aws" else ("g2-", "a2-")
    assert all(m.startswith(gpu_families) for m in machine.values()), machine
    assert {m.split(".")[0].split("-")[0] for m in machine.values()} == {
        f.strip(".-") for f in gpu_families}
    assert all(w["min_workers"] == 0 for w in workers.values())
    assert any(w["max_workers"] > 0 for w in workers.values())
    assert all(w["max_workers"] <= config["max_workers"] for w in workers.values())
    assert 0 < config["idle_timeout_minutes"] <= 30
    assert config["provider"]["cache_stopped_nodes"] is False
    assert config["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"


@pytest.mark.parametrize("path", _ray_up_files(), ids=lambda p: p.name)
def test_ray_up_config_offers_a_spot_worker_type(path):
    config = yaml.safe_load(path.read_text())
    spot = [k for k, v in config["available_node_types"].items()
            if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            or v["node_config"].get("scheduling", {}).get("provisioningModel") == "SPOT"]
    assert len(spot) == 1 and spot[0].endswith("spot")


@pytest.mark.parametrize("path", _ray_up_files(), ids=lambda p: p.name)
def test_ray_up_nodes_install_fgray_and_stage_data_to_local_disk(path):
    config = yaml.safe_load(path.read_text())
    assert config["file_mounts"]["~/fgray"] == "."
    setup = config["setup_commands"]
    assert any("pip install" in c and "fgray" in c for c in setup)
    staging = [c for c in setup if "cluster/stage_data.py" in c]
    assert staging == ['python ~/fgray/cluster/stage_data.py "$FGRAY_DATA_URI" '
                       '/mnt/local/datasets']
    options = config["docker"]["run_options"]
    assert "--volume /mnt/fgray-local:/mnt/local" in options
    assert "--env FGRAY_CACHE=/mnt/local/cache" in options
    bucket = "s3" if config["provider"]["type"] == "aws" else "gs"
    assert f"--env FGRAY_DATA_URI={bucket}://YOUR_BUCKET/datasets" in options
    assert any("/mnt/fgray-local" in c for c in config["initialization_commands"])


@pytest.mark.parametrize("path", _ray_up_files(), ids=lambda p: p.name)
def test_dashboard_listens_on_loopback_only(path):
    config = yaml.safe_load(path.read_text())
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in start


# --------------------------------------------------------------------------- KubeRay

def test_kuberay_has_a_raycluster_and_a_rayjob():
    kinds = {d["kind"] for p in _kuberay_files() for d in check.load_documents(p)
             if check.is_kuberay(d)}
    assert kinds == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("path", _kuberay_files(), ids=lambda p: p.name)
def test_kuberay_manifest_carries_required_fields(path):
    import ray

    for doc in (d for d in check.load_documents(path) if check.is_kuberay(d)):
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["kind"] in ("RayCluster", "RayJob")
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        spec = _cluster_spec(doc)
        assert spec["rayVersion"] == ray.__version__
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP"
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert head["template"]["spec"]["containers"][0]["image"]
        assert spec["enableInTreeAutoscaling"] is True
        groups = spec["workerGroupSpecs"]
        assert len(groups) >= 2
        for group in groups:
            assert group["groupName"] and group["minReplicas"] == 0 and group["maxReplicas"] > 0
            (container,) = group["template"]["spec"]["containers"]
            gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
            assert gpus >= 1
            assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == gpus
        for pod in [head] + groups:
            pod_spec = pod["template"]["spec"]
            assert pod_spec["serviceAccountName"] == "fgray-ray"  # bucket via workload identity
            (init,) = pod_spec["initContainers"]
            assert init["command"][1:] == ["/home/ray/fgray/cluster/stage_data.py",
                                           "$(FGRAY_DATA_URI)", "/mnt/local/datasets"]
        if doc["kind"] == "RayJob":
            assert doc["spec"]["entrypoint"].startswith("python studies/")
            assert doc["spec"]["shutdownAfterJobFinishes"] is True
            assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) == {
                "working_dir": "/home/ray/fgray"}


def test_kuberay_service_account_is_only_an_identity():
    (sa,) = check.load_documents(CLUSTER / "kuberay" / "serviceaccount.yaml")
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["name"] == "fgray-ray"
    assert "secrets" not in sa and "automountServiceAccountToken" not in sa


def test_image_versions_agree():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
    for path in _ray_up_files():
        assert yaml.safe_load(path.read_text())["docker"]["image"] == base
    version = base.split(":")[1].split("-")[0]
    for path in _kuberay_files():
        for doc in check.load_documents(path):
            assert _cluster_spec(doc)["rayVersion"] == version
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    assert [ln for ln in ignore if ln and not ln.startswith("#")][0] == "*"  # allow-list


# --------------------------------------------------------------------------- NetworkPolicy

KUBERAY = CLUSTER / "kuberay"


def _kuberay_folder_docs() -> list[tuple[str, dict]]:
    return [(f"{p.name}[{i}]", d) for p in sorted(KUBERAY.glob("*.yaml"))
            for i, d in enumerate(check.load_documents(p))]


def _kubernetes_manifests() -> list[tuple[str, dict]]:
    return [(w, d) for w, d in _kuberay_folder_docs() if check.is_kubernetes_manifest(d)]


def _policies() -> tuple[dict, dict]:
    raycluster, rayjobs = check.load_documents(KUBERAY / "networkpolicy.yaml")
    return raycluster, rayjobs


def _with_policies(*policies: dict) -> list[tuple[str, dict]]:
    """The folder's RayCluster and RayJob, with `policies` instead of the folder's."""
    clusters = [(w, d) for w, d in _kuberay_folder_docs() if check.is_kuberay(d)]
    return clusters + [(f"np[{i}]", p) for i, p in enumerate(policies)]


def test_kuberay_folder_has_network_policies_for_ingress_only():
    kinds = sorted(d["kind"] for _, d in _kubernetes_manifests())
    assert kinds == ["NetworkPolicy", "NetworkPolicy", "ServiceAccount"]
    for policy in _policies():
        assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress stays open: the bucket
        assert "egress" not in policy["spec"]
    text = (KUBERAY / "networkpolicy.yaml").read_text()
    assert "remote code execution" in text and "Calico" in text and "Cilium" in text


@pytest.mark.parametrize("where,doc", _kubernetes_manifests(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_kubernetes_manifest_validates_against_the_kubernetes_schema(where, doc):
    import kubernetes_validate

    version = check.kubernetes_version()
    assert kubernetes_validate.validate(doc, version, strict=True) == version
    assert check.kubernetes_schema_errors(doc, version) == []


BROKEN_POLICY = {
    "unknown field": (lambda spec: spec["ingress"][0].update(sources=[]),
                      "Additional properties are not allowed ('sources' was unexpected)"),
    "endPort not a number": (lambda spec: spec["ingress"][0].update(
        ports=[{"port": 8265, "endPort": "x"}]), "'x' is not of type 'integer'"),
    "unquoted yes in a selector": (lambda spec: spec["podSelector"]["matchLabels"].update(
        {"ray.io/is-ray-node": True}), "True is not of type 'string'"),
    "policyTypes not a list": (lambda spec: spec.update(policyTypes="Ingress"),
                               "'Ingress' is not of type 'array'"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_POLICY))
def test_kubernetes_schema_check_refuses_a_broken_network_policy(name):
    import kubernetes_validate

    policy = copy.deepcopy(_policies()[0])
    breaks, message = BROKEN_POLICY[name]
    breaks(policy["spec"])
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(policy, check.kubernetes_version(), strict=True)
    (error,) = check.kubernetes_schema_errors(policy)
    assert error.startswith("spec.") and message in error


def test_kubernetes_schema_check_knows_kinds_and_named_ports():
    policy = copy.deepcopy(_policies()[0])
    policy["apiVersion"] = "extensions/v1beta1"  # removed in Kubernetes 1.16
    (error,) = check.kubernetes_schema_errors(policy, "1.30")
    assert error.startswith("Kubernetes 1.30 has no kind NetworkPolicy in extensions/v1beta1")
    # A port given as a string is a named container port, which the schema allows: the
    # network check resolves it against the pod's ports instead.
    policy = copy.deepcopy(_policies()[0])
    policy["spec"]["ingress"][0]["ports"] = [{"port": "dashboard"}]
    assert check.kubernetes_schema_errors(policy) == []


def test_network_policy_check_passes_on_the_repository():
    assert check.network_policy_problems(_kuberay_folder_docs()) == []
    report = check.check_folder(KUBERAY)
    assert report.problems == []
    assert {p.name for p in report.kubernetes_manifests} == {"networkpolicy.yaml",
                                                             "serviceaccount.yaml"}


def test_pods_are_labelled_as_kuberay_labels_them():
    (cluster,) = check.load_documents(KUBERAY / "raycluster.yaml")
    head, *workers = check.kuberay_pods(cluster)
    assert head.labels["ray.io/cluster"] == "fgray" and head.labels["ray.io/node-type"] == "head"
    assert head.labels["app.kubernetes.io/part-of"] == "fgray"  # from the pod template
    assert head.ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
    assert [w.labels["ray.io/group"] for w in workers] == ["gpu-x1", "gpu-x4"]
    (job,) = check.load_documents(KUBERAY / "rayjob-cub.yaml")
    # KubeRay names a RayJob's cluster <rayjob>-<5 random characters>: no selector names it.
    job_head = check.kuberay_pods(job)[0]
    assert not check.label_selector_matches(
        {"matchLabels": {"ray.io/cluster": "fgray-cub-sweep"}}, job_head.labels)
    assert check.submitter_pod(job).labels["batch.kubernetes.io/job-name"] == "fgray-cub-sweep"
    assert check.submitter_pod(cluster) is None


def test_label_selector_semantics():
    labels = {"a": "1", "b": "2"}
    match = check.label_selector_matches
    assert match({}, labels) and match(None, {})
    assert match({"matchLabels": {"a": "1"}}, labels)
    assert not match({"matchLabels": {"a": "1", "c": "3"}}, labels)
    expr = [{"key": "a", "operator": "In", "values": ["1", "9"]},
            {"key": "b", "operator": "NotIn", "values": ["9"]},
            {"key": "c", "operator": "NotIn", "values": ["9"]},
            {"key": "b", "operator": "Exists"}, {"key": "c", "operator": "DoesNotExist"}]
    assert match({"matchExpressions": expr}, labels)
    assert not match({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]},
                     labels)


def test_network_policy_check_catches_a_cluster_without_a_policy():
    problems = check.network_policy_problems(_with_policies(_policies()[1]))
    assert problems == [
        f"raycluster.yaml[0]: no NetworkPolicy selects the {role} pod of RayCluster fgray "
        f"(ray.io/cluster=fgray, ray.io/node-type={kind}): every pod in the Kubernetes cluster "
        "can reach its Ray ports"
        for role, kind in [("head", "head"), ("worker group gpu-x1", "worker"),
                           ("worker group gpu-x4", "worker")]]
    (cluster,) = check.load_documents(KUBERAY / "raycluster.yaml")
    assert len(check.network_policy_problems([("c", cluster)])) == 3


OPEN_DASHBOARD = {
    "rule without from": ({"ports": [{"port": 8265}]}, "everyone (the rule has no `from`)"),
    "empty from": ({"from": [], "ports": [{"protocol": "TCP", "port": 8265}]},
                   "everyone (the rule has no `from`)"),
    "named port": ({"from": [], "ports": [{"port": "dashboard"}]},
                   "everyone (the rule has no `from`)"),
    "ipBlock world": ({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 8265}]},
                      "ipBlock 0.0.0.0/0 (every address)"),
    "ipBlock private range": ({"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                               "ports": [{"port": 8000, "endPort": 9000}]}, "ipBlock 10.0.0.0/8"),
    "every pod of the namespace": ({"from": [{"podSelector": {}}], "ports": [{"port": 8265}]},
                                   "pods matching {}, which also match any pod without labels"),
    "every namespace": ({"from": [{"namespaceSelector": {}}], "ports": [{"port": 8265}]},
                        "every pod in namespaces matching {}"),
}


@pytest.mark.parametrize("name", sorted(OPEN_DASHBOARD))
def test_network_policy_check_catches_a_dashboard_open_to_others(name):
    rule, who = OPEN_DASHBOARD[name]
    raycluster, rayjobs = _policies()
    raycluster["spec"]["ingress"].append(rule)
    (problem,) = check.network_policy_problems(_with_policies(raycluster, rayjobs))
    assert problem.startswith(f"np[0]: ingress rule 1 lets {who}")
    assert "reach 8265 (dashboard/jobs API) of RayCluster fgray (head" in problem
    assert problem.endswith("only the cluster's own pods may")


def test_network_policy_check_catches_a_selector_that_misses_the_pods():
    raycluster, rayjobs = _policies()
    raycluster["spec"]["podSelector"] = {"matchLabels": {"ray.io/cluster": "fgray-typo"}}
    problems = check.network_policy_problems(_with_policies(raycluster, rayjobs))
    assert len(problems) == 3
    assert problems[0].startswith("raycluster.yaml[0]: no NetworkPolicy selects the head pod of "
                                  "RayCluster fgray")
    # The natural mistake for a RayJob: its cluster is not named after it.
    raycluster, rayjobs = _policies()
    rayjobs["spec"]["podSelector"] = {"matchLabels": {"ray.io/cluster": "fgray-cub-sweep"}}
    problems = check.network_policy_problems(_with_policies(raycluster, rayjobs))
    assert problems[0] == (
        "rayjob-cub.yaml[0]: no NetworkPolicy selects the head pod of RayJob fgray-cub-sweep "
        "(ray.io/cluster=fgray-cub-sweep-?????, ray.io/node-type=head): every pod in the "
        "Kubernetes cluster can reach its Ray ports")


def test_network_policy_check_catches_peers_wider_than_the_cluster():
    raycluster, rayjobs = _policies()
    # The pod-template label alone also matches the RayJob's pods and any non-Ray fgray pod.
    raycluster["spec"]["ingress"][0]["from"] = [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "fgray"}}}]
    (problem,) = check.network_policy_problems(_with_policies(raycluster, rayjobs))
    assert problem.startswith("np[0]: ingress rule 0 lets pods matching "
                              "{app.kubernetes.io/part-of=fgray}, which also match ")
    assert "reach every port, including 6379 (GCS), 8265 (dashboard/jobs API), 10001" in problem
    # The submitter may use the jobs API, and nothing else.
    raycluster, rayjobs = _policies()
    del rayjobs["spec"]["ingress"][1]["ports"]
    problems = check.network_policy_problems(_with_policies(raycluster, rayjobs))
    assert len(problems) == 2
    assert "(the submitter pod (Job fgray-cub-sweep), which needs 8265 only)" in problems[0]
    assert "(the KubeRay operator, which needs 8265 only)" in problems[1]


def test_network_policy_check_catches_a_policy_that_breaks_the_cluster():
    raycluster, rayjobs = _policies()
    raycluster["spec"]["ingress"][0]["ports"] = [{"port": 6379}]  # workers' other ports shut
    problems = check.network_policy_problems(_with_policies(raycluster, rayjobs))
    assert len(problems) == 3
    assert "keep the head, worker group gpu-x1, worker group gpu-x4 pod(s) of RayCluster fgray " \
           "from its head pod" in problems[0]
    raycluster, rayjobs = _policies()
    del rayjobs["spec"]["ingress"][1]
    problems = check.network_policy_problems(_with_policies(raycluster, rayjobs))
    assert [p.split(": ")[1] for p in problems] == [
        "the NetworkPolicies keep the submitter pod (Job fgray-cub-sweep) from 8265 on the "
        "head pod of RayJob fgray-cub-sweep",
        "the NetworkPolicies keep the KubeRay operator from 8265 on the head pod of RayJob "
        "fgray-cub-sweep"]


def test_check_configs_command_checks_network_policies_and_their_schema(tmp_path, capsys):
    folder = tmp_path / "kuberay"
    folder.mkdir()
    for name in ("raycluster.yaml", "rayjob-cub.yaml", "serviceaccount.yaml"):
        (folder / name).write_text((KUBERAY / name).read_text())
    assert check.main([str(folder)]) == 1
    out = capsys.readouterr().out
    assert "problem: kuberay/raycluster.yaml: no NetworkPolicy selects the head pod of " \
           "RayCluster fgray" in out
    assert "problem: kuberay/rayjob-cub.yaml: no NetworkPolicy selects the head pod of " \
           "RayJob fgray-cub-sweep" in out
    raycluster, rayjobs = _policies()
    raycluster["spec"]["ingress"][0]["sources"] = []
    (folder / "networkpolicy.yaml").write_text(yaml.safe_dump_all([raycluster, rayjobs]))
    assert check.main([str(folder)]) == 1
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"problem: kuberay/networkpolicy.yaml[0]: Kubernetes {check.kubernetes_version()} "
        "schema: spec.ingress.0: Additional properties are not allowed ('sources' was "
        "unexpected)"]
    del raycluster["spec"]["ingress"][0]["sources"]
    (folder / "networkpolicy.yaml").write_text(yaml.safe_dump_all([raycluster, rayjobs]))
    assert check.main([str(folder)]) == 0
    assert "2 KubeRay manifests, 2 Kubernetes manifests" in capsys.readouterr().out


# --------------------------------------------------------------------------- exposure

def _all_rule_sources() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for path in _yaml_files():
        out += [(f"{path.name}[{i}]", d) for i, d in enumerate(check.load_documents(path))]
    for path in sorted(CLUSTER.rglob("*.sh")):
        out.append((path.name, check.gcloud_firewall_rules(path.read_text())))
    return out


@pytest.mark.parametrize("where,doc", _all_rule_sources(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_no_config_opens_anything_to_the_internet(where, doc):
    assert check.find_exposures(doc, where) == []


WORLD_OPEN = {
    "ray provider.security_group": {"provider": {"security_group": {"IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265,
         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}}},
    "aws all protocols": {"IpPermissions": [
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/8"}, {"CidrIp": "0.0.0.0/0"}]}]},
    "aws ipv6 client port": {"IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 10001, "ToPort": 10001,
         "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}]},
    "cloudformation range over gcs": {"Resources": {"Sg": {
        "Type": "AWS::EC2::SecurityGroup", "Properties": {"SecurityGroupIngress": [
            {"IpProtocol": "tcp", "FromPort": 6000, "ToPort": 7000, "CidrIp": "0.0.0.0/0"}]}}}},
    "cloudformation standalone ingress": {"Resources": {"In": {
        "Type": "AWS::EC2::SecurityGroupIngress", "Properties": {
            "IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "CidrIp": "0.0.0.0/1"}}}},
    "gcp firewall api": [{"name": "open", "direction": "INGRESS",
                          "sourceRanges": ["0.0.0.0/0"],
                          "allowed": [{"IPProtocol": "tcp", "ports": ["6379", "8265"]}]}],
    "kubernetes LoadBalancer": {"apiVersion": "v1", "kind": "Service", "spec": {
        "type": "LoadBalancer", "ports": [{"port": 8265, "targetPort": 8265}]}},
    "kubernetes NodePort": {"apiVersion": "v1", "kind": "Service", "spec": {
        "type": "NodePort", "ports": [{"port": 10001, "nodePort": 31001}]}},
    "raycluster head LoadBalancer": {"apiVersion": "ray.io/v1", "kind": "RayCluster", "spec": {
        "headGroupSpec": {"serviceType": "LoadBalancer", "rayStartParams": {}}}},
    "rayjob head ingress": {"apiVersion": "ray.io/v1", "kind": "RayJob", "spec": {
        "rayClusterSpec": {"headGroupSpec": {"enableIngress": True, "rayStartParams": {}}}}},
}


@pytest.mark.parametrize("name", sorted(WORLD_OPEN))
def test_exposure_checker_catches_a_world_open_ray_port(name):
    found = check.find_exposures(WORLD_OPEN[name], name)
    assert found, f"{name} was not caught"
    assert all(check.is_world(e.source) for e in found)
    assert any(e.ray_ports for e in found)
    assert re.search(r"including Ray's (6379|8265|10001)", str(found[0]))


def test_exposure_checker_names_exactly_the_ray_ports_a_rule_covers():
    (e,) = check.find_exposures(WORLD_OPEN["cloudformation range over gcs"])
    assert e.ray_ports == [6379]
    (e,) = check.find_exposures(WORLD_OPEN["aws all protocols"])
    assert e.ray_ports == list(RAY_PORTS)


def test_exposure_checker_also_refuses_world_open_ssh_but_not_a_narrow_cidr():
    ssh = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}
    (e,) = check.find_exposures({"IpPermissions": [{**ssh, "CidrIp": "0.0.0.0/0"}]})
    assert e.ports == ((22, 22),) and e.ray_ports == []
    assert check.find_exposures({"IpPermissions": [{**ssh, "CidrIp": "203.0.113.7/32"}]}) == []
    # A value set at deploy time (CloudFormation Ref, shell variable) is not a literal CIDR.
    assert check.find_exposures({"IpPermissions": [{**ssh, "CidrIp": {"Ref": "SshCidr"}}]}) == []


def test_exposure_checker_knows_what_ray_up_opens_by_default():
    aws = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    del aws["available_node_types"]["gpu-p4d-24xlarge"]["node_config"]["SecurityGroupIds"]
    (e,) = check.find_exposures(aws, "aws")
    assert e.where.startswith("aws.available_node_types.gpu-p4d-24xlarge (no SecurityGroupIds")
    assert (e.source, e.ports) == ("0.0.0.0/0", ((22, 22),))
    gcp = yaml.safe_load((CLUSTER / "gcp-gpu.yaml").read_text())
    del gcp["available_node_types"]["ray_head_cpu"]["node_config"]["networkInterfaces"]
    (e,) = check.find_exposures(gcp, "gcp")
    assert "ray_head_cpu (no networkInterfaces" in e.where


def test_exposure_checker_ignores_egress():
    egress = {"SecurityGroupEgress": [{"IpProtocol": "-1", "CidrIp": "0.0.0.0/0"}]}
    assert check.find_exposures(egress) == []
    assert check.find_exposures([{"direction": "EGRESS", "sourceRanges": ["0.0.0.0/0"],
                                  "allowed": [{"IPProtocol": "all"}]}]) == []


def test_gcloud_parser_reads_firewall_commands_as_gcp_would():
    script = """
    gcloud compute firewall-rules create a --network n --allow tcp:22 --source-ranges "$CIDR"
    "${gc[@]}" compute firewall-rules create b --network n --allow=tcp:8265,udp \\
        --enable-logging --source-ranges=0.0.0.0/0 && echo done
    gcloud compute firewall-rules create c --network n --allow tcp:6379
    gcloud compute firewall-rules create d --network n --allow all --source-tags t  # comment
    # gcloud compute firewall-rules create e --allow tcp:8265 --source-ranges 0.0.0.0/0
    """
    parsed = check.gcloud_firewall_rules(script)
    rules = {r["name"]: r for r in parsed}
    assert sorted(rules) == ["a", "b", "c", "d"]
    assert rules["a"]["sourceRanges"] == ["$CIDR"]
    assert rules["b"]["sourceRanges"] == ["0.0.0.0/0"]  # not eaten by the boolean flag
    assert rules["b"]["allowed"] == [{"IPProtocol": "tcp", "ports": ["8265"]},
                                     {"IPProtocol": "udp"}]
    assert rules["c"]["sourceRanges"] == ["0.0.0.0/0"]  # gcloud's default without sources
    assert "sourceRanges" not in rules["d"]
    exposed = {parsed[int(e.where[2:-1])]["name"] for e in check.find_exposures(parsed, "s")}
    assert exposed == {"b", "c"}


def test_aws_prereqs_allow_ssh_from_the_given_cidr_and_nothing_else():
    (cfn,) = check.load_documents(CLUSTER / "aws-prereqs.cfn.yaml")
    resources = cfn["Resources"]
    sg = resources["RaySecurityGroup"]["Properties"]
    assert sg["SecurityGroupIngress"] == [{
        "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "CidrIp": {"Ref": "SshCidr"},
        "Description": sg["SecurityGroupIngress"][0]["Description"]}]
    ingress = [r["Properties"] for r in resources.values()
               if r["Type"] == "AWS::EC2::SecurityGroupIngress"]
    assert ingress == [{**ingress[0], "SourceSecurityGroupId":
                        {"Fn::GetAtt": ["RaySecurityGroup", "GroupId"]}}]
    assert "CidrIp" not in ingress[0]
    assert "Default" not in cfn["Parameters"]["SshCidr"]  # the user must choose it
    (assertion,) = cfn["Rules"]["SshIsNotOpenToTheWorld"]["Assertions"]
    assert assertion["Assert"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "SshCidr"},
                                                               "0.0.0.0/0"]}]}


def test_aws_ray_config_uses_the_prereq_group_and_roles():
    (cfn,) = check.load_documents(CLUSTER / "aws-prereqs.cfn.yaml")
    res = cfn["Resources"]
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    assert "security_group" not in config["provider"]  # no group of Ray's own making
    types = config["available_node_types"]
    # Every node type pins the stack's group; the placeholder is the stack output's name.
    assert {tuple(v["node_config"]["SecurityGroupIds"]) for v in types.values()} == {
        ("YOUR_SECURITY_GROUP_ID",)}
    assert cfn["Outputs"]["SecurityGroupId"]["Value"] == {
        "Fn::GetAtt": ["RaySecurityGroup", "GroupId"]}
    profiles = {k: v["node_config"]["IamInstanceProfile"]["Name"] for k, v in types.items()}
    assert profiles.pop(config["head_node_type"]) == \
        res["HeadInstanceProfile"]["Properties"]["InstanceProfileName"]
    assert set(profiles.values()) == {
        res["WorkerInstanceProfile"]["Properties"]["InstanceProfileName"]}
    # The head may hand workers the worker role and no other.
    statements = res["HeadRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    (pass_role,) = [s for s in statements if s["Action"] == "iam:PassRole"]
    assert pass_role["Resource"] == {"Fn::GetAtt": ["WorkerRole", "Arn"]}
    # The head resolves the AMI parameter when it launches workers, so it may read it.
    images = {v["node_config"]["ImageId"] for v in types.values()}
    (image,) = images
    assert image.startswith("resolve:ssm:/aws/service/deeplearning/")
    (ssm,) = [s for s in statements if s["Action"] == "ssm:GetParameters"]
    assert ssm["Resource"]["Fn::Sub"].endswith("parameter/aws/service/deeplearning/*")


def test_gcp_prereqs_allow_ssh_from_the_given_cidr_and_internal_traffic_only():
    script = (CLUSTER / "gcp-prereqs.sh").read_text()
    rules = {r["name"]: r for r in check.gcloud_firewall_rules(script)}
    assert rules == {
        "fgray-ray-ssh": {"name": "fgray-ray-ssh", "direction": "INGRESS",
                          "allowed": [{"IPProtocol": "tcp", "ports": ["22"]}],
                          "sourceRanges": ["$SSH_CIDR"]},
        "fgray-ray-internal": {"name": "fgray-ray-internal", "direction": "INGRESS",
                               "allowed": [{"IPProtocol": "tcp"}, {"IPProtocol": "udp"},
                                           {"IPProtocol": "icmp"}]},
    }
    assert '--source-tags "$TAG" --target-tags "$TAG"' in script


def test_gcp_prereqs_refuse_a_world_open_ssh_cidr_before_touching_the_project(tmp_path):
    # A gcloud that records any call: the guard must stop the script before the first one.
    fake = tmp_path / "gcloud"
    fake.write_text(f"#!/bin/sh\necho called >> {tmp_path / 'calls'}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PROJECT_ID": "p",
           "BUCKET": "b", "SSH_CIDR": "0.0.0.0/0"}
    run = subprocess.run(["bash", str(CLUSTER / "gcp-prereqs.sh")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "would open SSH to the world" in run.stderr
    assert not (tmp_path / "calls").exists()


def test_gcp_ray_config_lives_on_the_prereq_network():
    script = (CLUSTER / "gcp-prereqs.sh").read_text()
    network = re.search(r"^NETWORK=(\S+)", script, re.M).group(1)
    tag = re.search(r"^TAG=(\S+)", script, re.M).group(1)
    account = re.search(r'^WORKER_SA="([\w-]+)@', script, re.M).group(1)
    config = yaml.safe_load((CLUSTER / "gcp-gpu.yaml").read_text())
    region = config["provider"]["region"]
    assert re.search(rf'^REGION="\${{REGION:-{region}}}"', script, re.M)
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        (nic,) = node["networkInterfaces"]
        assert nic["subnetwork"] == f"regions/{region}/subnetworks/{network}"
        assert node["tags"] == {"items": [tag]}
        if name != config["head_node_type"]:
            (sa,) = node["serviceAccounts"]
            assert sa["email"].startswith(f"{account}@")


# --------------------------------------------------------------------------- token auth

@pytest.mark.parametrize("path", _ray_up_files() + _kuberay_files(), ids=lambda p: p.name)
def test_token_auth_is_on(path):
    for i, doc in enumerate(check.load_documents(path)):
        assert check.token_auth_problems(doc, f"{path.name}[{i}]", REPO) == []


def _aws_config() -> dict:
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def test_token_check_catches_a_container_without_the_auth_mode():
    config = _aws_config()
    config["docker"]["run_options"].remove("--env RAY_AUTH_MODE=token")
    (problem,) = check.token_auth_problems(config, "c", REPO)
    assert "docker.run_options must set RAY_AUTH_MODE=token" in problem


def test_token_check_catches_ray_start_without_the_auth_mode():
    config = _aws_config()
    config["worker_start_ray_commands"] = ["ray stop",
                                           "ray start --address=$RAY_HEAD_IP:6379"]
    (problem,) = check.token_auth_problems(config, "c", REPO)
    assert "worker_start_ray_commands runs `ray start` without" in problem


def test_token_check_catches_disabled_auth_and_token_literals():
    config = _aws_config()
    config["docker"]["run_options"] += ["--env RAY_AUTH_MODE=disabled",
                                        "--env RAY_AUTH_TOKEN=abc123"]
    problems = check.token_auth_problems(config, "c", REPO)
    assert any("other than token" in p for p in problems)
    assert any("token literal" in p for p in problems)


def test_token_check_catches_a_token_file_inside_the_repository():
    config = _aws_config()
    config["file_mounts"]["/home/ray/ray_auth_token"] = str(CLUSTER / "auth_token")
    (problem,) = check.token_auth_problems(config, "c", REPO)
    assert "inside the repository" in problem


def test_token_check_catches_a_token_that_never_reaches_the_nodes():
    config = _aws_config()
    del config["file_mounts"]["/home/ray/ray_auth_token"]
    (problem,) = check.token_auth_problems(config, "c", REPO)
    assert "is not a file_mounts target" in problem


def test_token_check_catches_kuberay_without_token_mode():
    (doc,) = check.load_documents(CLUSTER / "kuberay" / "rayjob-cub.yaml")
    doc["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "disabled"
    (problem,) = check.token_auth_problems(doc, "job")
    assert "RayJob lacks authOptions.mode: token" in problem
    (doc,) = check.load_documents(CLUSTER / "kuberay" / "raycluster.yaml")
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [{"name": "RAY_AUTH_TOKEN", "value": "abc123"}]
    (problem,) = check.token_auth_problems(doc, "cluster")
    assert "env RAY_AUTH_TOKEN has a literal value" in problem


CREDENTIAL_PATTERNS = [r"AKIA[0-9A-Z]{16}", r"(?i)aws_secret_access_key", r"(?i)private_key",
                       r"GOOGLE_APPLICATION_CREDENTIALS", r"gcp_credentials",
                       r"BEGIN [A-Z ]*PRIVATE KEY", r"(?i)ssh_private_key"]


def test_configs_carry_no_credentials():
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix != ".md"
             and "__pycache__" not in p.parts and p.name != "test_cluster.py"]
    scanned = [p for p in files if p.suffix in (".yaml", ".sh") or p.name.startswith("Docker")]
    assert len(scanned) >= 7
    for path in scanned:
        text = path.read_text()
        for pattern in CREDENTIAL_PATTERNS:
            assert not re.search(pattern, text), f"{path.name} matches {pattern}"
    assert not [p for p in files if p.name == "auth_token" or p.suffix in (".pem", ".key")]


def test_check_configs_command_passes_on_the_repository_and_fails_on_a_bad_folder(
        tmp_path, capsys):
    assert check.main([str(CLUSTER)]) == 0
    assert "ok: 2 ray up configs, 2 KubeRay manifests" in capsys.readouterr().out
    bad = _aws_config()
    bad["provider"]["security_group"] = {"IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "CidrIp": "0.0.0.0/0"}]}
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert check.main([str(tmp_path / "cluster")]) == 1
    out = capsys.readouterr().out
    assert "problem: cluster/bad.yaml.provider.security_group.IpPermissions[0]: open to " \
           "0.0.0.0/0 on ports 8265, including Ray's 8265 (dashboard/jobs API)" in out


# --------------------------------------------------------------------------- entrypoints

def _study_commands() -> dict[str, set[str]]:
    flags: dict[str, set[str]] = {}
    for path in sorted(CLUSTER.rglob("*")):
        if path.suffix in (".yaml", ".yml", ".md", ".sh"):
            for script, used in check.study_commands_in_file(path):
                flags.setdefault(script, set()).update(used)
    return flags


def test_configs_and_readme_name_the_cub_study():
    commands = _study_commands()
    assert "studies/cub_sweep.py" in commands
    assert {"--data-root", "--storage", "--preset"} <= commands["studies/cub_sweep.py"]


def test_study_commands_are_parsed_from_entrypoints_and_docs():
    text = ("`python studies/a.py --help` and\n"
            "ray job submit --working-dir . -- python studies/b_c.py --data-root /d \\\n"
            "    --storage s3://x/y --resume | tee log\n")
    assert check.study_commands(text) == [("studies/a.py", ["--help"]),
                                          ("studies/b_c.py",
                                           ["--data-root", "--storage", "--resume"])]


@cache
def _help(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("script", sorted(_study_commands()))
def test_named_study_exists_and_answers_help_with_every_flag_used(script):
    assert (REPO / script).is_file(), f"{script} is named in cluster/ but does not exist"
    run = _help(script)
    assert run.returncode == 0, run.stderr[-2000:]
    for flag in sorted(_study_commands()[script] - {"--help"}):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", run.stdout), \
            f"{script} --help does not list {flag}"


# --------------------------------------------------------------------------- staging

def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "bucket" / "datasets"
    (src / "CUB_200_2011" / "images" / "001.A").mkdir(parents=True)
    (src / "CUB_200_2011" / "images.txt").write_text("1 001.A/x.jpg\n")
    (src / "CUB_200_2011" / "images" / "001.A" / "x.jpg").write_bytes(os.urandom(3000))
    (src / "notes.md").write_text("n")
    old = time.time() - 3600
    for p in src.rglob("*"):
        os.utime(p, (old, old))
    return src


def test_stage_copies_the_tree_with_contents_and_times(tmp_path):
    src = _source(tmp_path)
    dest = tmp_path / "local" / "datasets"
    report = stage_data.stage(str(src), dest, threads=2)
    assert _tree(dest) == _tree(src)
    assert report == stage_data.StageReport(copied=3, skipped=0,
                                            bytes_copied=sum(map(len, _tree(src).values())))
    for rel in _tree(src):
        assert int((dest / rel).stat().st_mtime) == int((src / rel).stat().st_mtime)
    assert not list(dest.rglob(".*part-*"))


def test_stage_again_copies_only_what_changed(tmp_path):
    src = _source(tmp_path)
    dest = tmp_path / "local"
    stage_data.stage(f"file://{src}", dest)
    assert stage_data.stage(f"file://{src}", dest) == stage_data.StageReport(0, 3, 0)
    (src / "notes.md").write_text("longer notes")
    (dest / "CUB_200_2011" / "images.txt").unlink()
    report = stage_data.stage(str(src), dest)
    assert (report.copied, report.skipped) == (2, 1)
    assert report.bytes_copied == len("longer notes") + len("1 001.A/x.jpg\n")
    assert _tree(dest) == _tree(src)


def test_stage_refuses_missing_file_and_empty_sources(tmp_path):
    with pytest.raises(UserError, match=r"does not exist \(upload the dataset first\)"):
        stage_data.stage(str(tmp_path / "nope"), tmp_path / "d")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserError, match="is a file: expected a folder"):
        stage_data.stage(str(tmp_path / "f.txt"), tmp_path / "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no files"):
        stage_data.stage(str(tmp_path / "empty"), tmp_path / "d")
    with pytest.raises(UserError, match="--threads 0"):
        stage_data.stage(str(tmp_path / "empty"), tmp_path / "d", threads=0)


def test_stage_command_line(tmp_path):
    script = str(CLUSTER / "stage_data.py")
    src = _source(tmp_path)
    ok = subprocess.run([sys.executable, script, str(src), str(tmp_path / "d")],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0
    assert ok.stdout.startswith("stage_data: 3 files (") and "0 already up to date" in ok.stdout
    bad = subprocess.run([sys.executable, script, str(tmp_path / "nope"), str(tmp_path / "d")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: dataset source {tmp_path / 'nope'} does not exist (upload the dataset first)"]
    skip = subprocess.run([sys.executable, script, "", str(tmp_path / "e")],
                          capture_output=True, text=True, timeout=120)
    assert skip.returncode == 0 and "nothing staged" in skip.stdout
    assert not (tmp_path / "e").exists()
