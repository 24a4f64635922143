"""Static checks for the cluster configs in this folder; run after editing, before launching.

    python cluster/check_configs.py [FOLDER]

- every `ray up` config validates against the JSON schema shipped inside the installed ray;
- no firewall rule, security group, Kubernetes Service or Ingress opens anything to the whole
  internet (0.0.0.0/0 or ::/0), least of all Ray's GCS (6379), dashboard/jobs API (8265) or
  client (10001) ports: an unauthenticated jobs API is remote code execution for anyone who
  reaches it, and a token only helps if it cannot be brute-forced from the whole internet;
- Ray token authentication (RAY_AUTH_MODE=token) is on in every cluster, the token comes from
  a file outside the repository or a Kubernetes Secret, and no token literal is written here;
- every pod of every KubeRay RayCluster/RayJob is selected by a NetworkPolicy that lets only
  the cluster's own pods (and a RayJob's submitter and the KubeRay operator, on 8265) reach
  Ray's ports, and still lets the cluster work;
- every plain Kubernetes manifest (NetworkPolicy, ServiceAccount ...) validates against
  Kubernetes' own schema (kubernetes-validate, offline, unknown fields refused).

The walkers read parsed structures (YAML documents, or the gcloud commands of a shell
script turned into firewall-rule dicts), so they work on the repository's files and on any
config a test builds. Exit status 1 lists every problem found; 0 prints a summary.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RAY_PORTS = {6379: "GCS", 8265: "dashboard/jobs API", 10001: "Ray client"}
ALL_PORTS = (0, 65535)
_SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}


# ----------------------------------------------------------------------------- loading

def load_documents(path: str | Path) -> list[Any]:
    """Every YAML document in a file (KubeRay manifests may hold several)."""
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def ray_schema() -> dict:
    """The autoscaler config schema of the installed ray, found without importing ray."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ray is not installed: cannot find ray/autoscaler/ray-schema.json")
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text(encoding="utf-8"))


def is_ray_up_config(doc: Any) -> bool:
    return isinstance(doc, dict) and "cluster_name" in doc and "provider" in doc


def is_kuberay(doc: Any) -> bool:
    return isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/")


def schema_errors(config: dict, schema: dict | None = None) -> list[str]:
    """Schema violations of one `ray up` config, each as `path: message`."""
    import jsonschema

    validator = jsonschema.Draft7Validator(schema or ray_schema())
    return [f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
            for e in sorted(validator.iter_errors(config), key=lambda e: list(e.path))]


# ----------------------------------------------------------------------------- exposure

@dataclass(frozen=True)
class Exposure:
    """One ingress rule that lets the whole internet in."""

    where: str
    source: str
    ports: tuple[tuple[int, int], ...]  # inclusive ranges; empty for port-less protocols

    @property
    def ray_ports(self) -> list[int]:
        return [p for p in RAY_PORTS if any(lo <= p <= hi for lo, hi in self.ports)]

    def __str__(self) -> str:
        spans = ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports)
        ray = ", ".join(f"{p} ({RAY_PORTS[p]})" for p in self.ray_ports)
        return (f"{self.where}: open to {self.source} on ports {spans or 'none (icmp)'}"
                + (f", including Ray's {ray}" if ray else ""))


def is_world(cidr: Any) -> bool:
    """True for a literal CIDR that covers every address (0.0.0.0/0, ::/0, 0.0.0.0/1 ...).

    Anything that is not a literal (a CloudFormation Ref, a shell variable) is user-set and
    checked where it is set (the stack's Rules, the script's guard)."""
    if not isinstance(cidr, str):
        return False
    try:
        net = ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError:
        return False
    # Half the address space is as good as all of it for an attacker.
    return net.prefixlen <= 1


def _port_range(lo: Any, hi: Any) -> tuple[int, int]:
    if lo in (None, -1, "-1") and hi in (None, -1, "-1"):
        return ALL_PORTS
    lo_i = int(lo) if lo not in (None, -1, "-1") else ALL_PORTS[0]
    hi_i = int(hi) if hi not in (None, -1, "-1") else ALL_PORTS[1]
    return (lo_i, hi_i)


def _aws_rule_ports(rule: dict) -> tuple[tuple[int, int], ...]:
    proto = str(rule.get("IpProtocol", "")).lower()
    if proto in ("-1", "all"):
        return (ALL_PORTS,)
    if proto in ("icmp", "icmpv6", "1", "58"):
        return ()
    return (_port_range(rule.get("FromPort"), rule.get("ToPort")),)


def _aws_rule_sources(rule: dict) -> list[Any]:
    sources = [rule.get("CidrIp"), rule.get("CidrIpv6")]
    sources += [r.get("CidrIp") for r in rule.get("IpRanges") or [] if isinstance(r, dict)]
    sources += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges") or [] if isinstance(r, dict)]
    return [s for s in sources if s is not None]


def _gcp_rule_ports(rule: dict) -> tuple[tuple[int, int], ...]:
    spans: list[tuple[int, int]] = []
    for allowed in rule.get("allowed") or []:
        proto = str(allowed.get("IPProtocol", "")).lower()
        if proto in ("icmp", "ipip", "esp", "ah", "sctp") and not allowed.get("ports"):
            continue
        ports = allowed.get("ports")
        if proto == "all" or not ports:
            spans.append(ALL_PORTS)
            continue
        for p in ports:
            lo, _, hi = str(p).partition("-")
            spans.append((int(lo), int(hi or lo)))
    return tuple(spans)


def _k8s_service_ports(spec: dict) -> tuple[tuple[int, int], ...]:
    spans = []
    for p in spec.get("ports") or []:
        for key in ("port", "targetPort", "nodePort"):
            if isinstance(p.get(key), int):
                spans.append((p[key], p[key]))
    return tuple(spans)


def _walk(node: Any, where: str) -> Iterator[tuple[dict, str]]:
    if isinstance(node, dict):
        yield node, where
        for key, value in node.items():
            yield from _walk(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{where}[{i}]")


def _is_egress(node: dict, where: str) -> bool:
    # The key holding the rule (SecurityGroupEgress, IpPermissionsEgress), its CloudFormation
    # resource type, or a GCP rule's direction.
    key = re.sub(r"(\[\d+\])+$", "", where).rsplit(".", 1)[-1]
    return ("egress" in key.lower() or str(node.get("Type", "")).endswith("Egress")
            or str(node.get("direction", "")).upper() == "EGRESS")


def find_exposures(doc: Any, where: str = "<config>") -> list[Exposure]:
    """Every ingress rule in `doc` open to the whole internet, wherever it is nested.

    Understands AWS security-group permissions (Ray's provider.security_group.IpPermissions,
    boto3 IpPermissions, CloudFormation SecurityGroupIngress), GCP firewall rules (Compute
    API shape: sourceRanges + allowed, as `gcloud_firewall_rules` returns them), Kubernetes
    Services of type LoadBalancer/NodePort, Ingresses, and RayCluster head services."""
    found: list[Exposure] = ray_default_exposures(doc, where) if is_ray_up_config(doc) else []
    for node, at in _walk(doc, where):
        if _is_egress(node, at):
            continue
        if "IpProtocol" in node:
            found += [Exposure(at, s, _aws_rule_ports(node))
                      for s in _aws_rule_sources(node) if is_world(s)]
        elif "allowed" in node or "sourceRanges" in node:
            found += [Exposure(at, s, _gcp_rule_ports(node))
                      for s in node.get("sourceRanges") or [] if is_world(s)]
        found += _kubernetes_exposures(node, at)
    return found


def ray_default_exposures(config: dict, where: str = "<config>") -> list[Exposure]:
    """What `ray up` would open by filling in its own network defaults.

    On AWS, a node type without SecurityGroupIds (or NetworkInterfaces) gets Ray's default
    security group, whose SSH rule is open to 0.0.0.0/0. On GCP, a node type without
    networkInterfaces lands on the first subnet Ray finds, usually in the `default` network,
    whose default-allow-ssh rule is open to 0.0.0.0/0."""
    provider = (config.get("provider") or {}).get("type")
    found = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        node = node_type.get("node_config") or {}
        at = f"{where}.available_node_types.{name}"
        if provider == "aws" and not (node.get("SecurityGroupIds")
                                      or node.get("NetworkInterfaces")):
            found.append(Exposure(f"{at} (no SecurityGroupIds: Ray's default security group)",
                                  "0.0.0.0/0", ((22, 22),)))
        if provider == "gcp" and not node.get("networkInterfaces"):
            found.append(Exposure(f"{at} (no networkInterfaces: a subnet Ray picks, usually "
                                  "the default network)", "0.0.0.0/0", ((22, 22),)))
    return found


def _kubernetes_exposures(node: dict, at: str) -> list[Exposure]:
    kind = node.get("kind")
    spec = node.get("spec") if isinstance(node.get("spec"), dict) else {}
    if kind == "Service" and spec.get("type") in ("LoadBalancer", "NodePort"):
        ranges = spec.get("loadBalancerSourceRanges") or ["0.0.0.0/0"]
        return [Exposure(f"{at} (Service type {spec['type']})", r, _k8s_service_ports(spec))
                for r in ranges if is_world(r)]
    if kind == "Ingress":
        return [Exposure(f"{at} (Ingress)", "0.0.0.0/0", (ALL_PORTS,))]
    head = node.get("headGroupSpec")
    if isinstance(head, dict):
        service_type = head.get("serviceType") or (head.get("headService") or {}).get(
            "spec", {}).get("type")
        if service_type in ("LoadBalancer", "NodePort"):
            return [Exposure(f"{at}.headGroupSpec (serviceType {service_type})", "0.0.0.0/0",
                             tuple((p, p) for p in RAY_PORTS))]
        if head.get("enableIngress"):
            return [Exposure(f"{at}.headGroupSpec (enableIngress)", "0.0.0.0/0",
                             ((8265, 8265),))]
    return []


def _shell_commands(script: str) -> Iterator[list[str]]:
    """Simple commands of a shell script, as token lists (continuations and comments handled)."""
    joined = re.sub(r"\\\n", " ", script)
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        command: list[str] = []
        for token in lexer:
            if token in _SHELL_OPERATORS:
                if command:
                    yield command
                command = []
            else:
                command.append(token)
        if command:
            yield command


def gcloud_firewall_rules(script: str) -> list[dict]:
    """`gcloud compute firewall-rules create|update` calls of a script as Compute API dicts."""
    rules = []
    for cmd in _shell_commands(script):
        if "firewall-rules" not in cmd:
            continue
        i = cmd.index("firewall-rules")
        if cmd[i + 1:i + 2] not in (["create"], ["update"]):
            continue
        flags: dict[str, str] = {}
        args = cmd[i + 3:]
        for j, arg in enumerate(args):
            if not arg.startswith("--"):
                continue
            name, eq, value = arg[2:].partition("=")
            if not eq:  # `--flag value`, or a boolean flag when another flag follows
                nxt = args[j + 1] if j + 1 < len(args) else ""
                value = "" if nxt.startswith("--") else nxt
            flags[name] = value
        rule: dict[str, Any] = {"name": cmd[i + 2] if len(cmd) > i + 2 else "",
                                "direction": flags.get("direction", "INGRESS").upper()}
        if "allow" in flags:
            by_proto: dict[str, list[str]] = {}
            for item in flags["allow"].split(","):
                proto, _, port = item.partition(":")
                by_proto.setdefault(proto.lower(), []).extend([port] if port else [])
            rule["allowed"] = [{"IPProtocol": p, **({"ports": ports} if ports else {})}
                               for p, ports in by_proto.items()]
        # gcloud's own default: no source ranges and no source tags/accounts means 0.0.0.0/0.
        if "source-ranges" in flags:
            rule["sourceRanges"] = flags["source-ranges"].split(",")
        elif not ({"source-tags", "source-service-accounts"} & flags.keys()):
            rule["sourceRanges"] = ["0.0.0.0/0"]
        rules.append(rule)
    return rules


# ----------------------------------------------------------------------------- token auth

def _env_pairs(node: Any) -> Iterator[tuple[str, dict]]:
    for item, _ in _walk(node, ""):
        if isinstance(item.get("name"), str) and ("value" in item or "valueFrom" in item):
            yield item["name"], item


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def token_auth_problems(doc: Any, where: str = "<config>", repo_root: Path | None = None
                        ) -> list[str]:
    """Why token auth is not (surely) on in a `ray up` config or KubeRay manifest; [] if it is."""
    problems = []
    for text in _strings(doc):
        if re.search(r"RAY_AUTH_MODE=(?!token\b)", text):
            problems.append(f"{where}: sets RAY_AUTH_MODE to something other than token")
        if re.search(r"RAY_AUTH_TOKEN=\S", text):
            problems.append(f"{where}: writes a token literal (RAY_AUTH_TOKEN=...) into the config")
    for name, env in _env_pairs(doc):
        if name == "RAY_AUTH_TOKEN" and "value" in env:
            problems.append(f"{where}: env RAY_AUTH_TOKEN has a literal value; use a Secret")
        if name == "RAY_AUTH_MODE" and env.get("value") != "token":
            problems.append(f"{where}: env RAY_AUTH_MODE is {env.get('value')!r}, not 'token'")
    if is_ray_up_config(doc):
        problems += _ray_up_token_problems(doc, where, repo_root)
    elif is_kuberay(doc):
        spec = doc.get("spec") or {}
        cluster = spec.get("rayClusterSpec", spec) if doc.get("kind") == "RayJob" else spec
        if (cluster.get("authOptions") or {}).get("mode") != "token":
            problems.append(f"{where}: {doc.get('kind')} lacks authOptions.mode: token")
    return problems


def _ray_up_token_problems(cfg: dict, where: str, repo_root: Path | None) -> list[str]:
    problems = []
    docker = cfg.get("docker") or {}
    options = " ".join(str(o) for o in docker.get("run_options") or [])
    if not re.search(r"RAY_AUTH_MODE=token\b", options):
        problems.append(f"{where}: docker.run_options must set RAY_AUTH_MODE=token so every "
                        "process in the container (raylets, dashboard, job drivers) has it")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in cfg.get(key) or []:
            if "ray start" in command and not re.search(r"RAY_AUTH_MODE=token\s+ray start",
                                                         command):
                problems.append(f"{where}: {key} runs `ray start` without RAY_AUTH_MODE=token")
    mounts = cfg.get("file_mounts") or {}
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", options)
    if token_path is None:
        problems.append(f"{where}: docker.run_options must set RAY_AUTH_TOKEN_PATH to the "
                        "mounted token file")
    elif token_path.group(1) not in mounts:
        problems.append(f"{where}: RAY_AUTH_TOKEN_PATH {token_path.group(1)} is not a "
                        "file_mounts target, so the nodes would have no token")
    else:
        source = Path(mounts[token_path.group(1)]).expanduser()
        root = (repo_root or Path(__file__).resolve().parent.parent).resolve()
        if not source.is_absolute() or source.resolve().is_relative_to(root):
            problems.append(f"{where}: the token is mounted from {mounts[token_path.group(1)]}, "
                            "inside the repository; mount it from ~/.ray/auth_token")
    return problems


# ----------------------------------------------------------------------------- Kubernetes

# The Kubernetes minor version whose schema plain manifests are validated against; an older
# kubernetes-validate that does not ship it falls back to the newest it has.
KUBERNETES_VERSION = "1.35"
# A RayJob's cluster is named <rayjob>-<5 random characters>: no label value can equal this.
_RANDOM = "?????"
# The labels the KubeRay Helm chart puts on the operator pod (the README installs it so).
_OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator",
                    "app.kubernetes.io/instance": "kuberay-operator",
                    "app.kubernetes.io/component": "kuberay-operator"}


def is_kubernetes_manifest(doc: Any) -> bool:
    """A plain Kubernetes object (NetworkPolicy, ServiceAccount ...): not a Ray custom resource."""
    return (isinstance(doc, dict) and isinstance(doc.get("apiVersion"), str)
            and isinstance(doc.get("kind"), str) and not is_kuberay(doc))


def is_network_policy(doc: Any) -> bool:
    return is_kubernetes_manifest(doc) and doc["kind"] == "NetworkPolicy"


def kubernetes_version() -> str:
    """KUBERNETES_VERSION, or the newest the installed kubernetes-validate ships if older."""
    import kubernetes_validate
    from packaging.version import Version

    newest = ".".join(kubernetes_validate.latest_version().split(".")[:2])
    return min(KUBERNETES_VERSION, newest, key=Version)


def kubernetes_schema_errors(doc: dict, version: str | None = None) -> list[str]:
    """Why `doc` is not a valid object of Kubernetes `version` (strict: no unknown field)."""
    import kubernetes_validate

    version = version or kubernetes_version()
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"Kubernetes {version} has no kind {doc['kind']} in {doc['apiVersion']} (a typo, "
                "or a custom resource this checker does not know)"]
    return []


@dataclass
class Pod:
    """A pod as KubeRay (or the Job controller) will label it: what a NetworkPolicy selects."""

    role: str
    labels: dict
    namespace: str | None = None
    ports: dict = field(default_factory=dict)  # named container ports


def _ray_cluster_spec(doc: dict) -> dict:
    spec = doc.get("spec") or {}
    return (spec.get("rayClusterSpec") or {}) if doc.get("kind") == "RayJob" else spec


def _ray_groups(doc: dict) -> list[tuple[str, str, str, dict]]:
    """(role, node type, group label, pod template) of the head and of each worker group."""
    spec = _ray_cluster_spec(doc)
    head = spec.get("headGroupSpec") or {}
    groups = [("head", "head", "headgroup", head.get("template") or {})]
    for group in spec.get("workerGroupSpecs") or []:
        name = group.get("groupName", "")
        groups.append((f"worker group {name}", "worker", name, group.get("template") or {}))
    return groups


def _ray_node_labels(cluster: str, node_type: str, group: str, template: dict) -> dict:
    labels = {"ray.io/is-ray-node": "yes", "ray.io/identifier": f"{cluster}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by":
              "kuberay-operator"}
    labels.update((template.get("metadata") or {}).get("labels") or {})
    # KubeRay does not let the template override these three.
    labels.update({"ray.io/cluster": cluster, "ray.io/node-type": node_type, "ray.io/group": group})
    return labels


def kuberay_pods(doc: dict, cluster: str | None = None) -> list[Pod]:
    """The head and one pod per worker group of a RayCluster/RayJob, labelled as KubeRay does.

    A RayJob's cluster is named after it plus 5 random characters, so the ray.io/cluster label
    of its pods matches no value a selector could name in advance."""
    meta = doc.get("metadata") or {}
    if cluster is None:
        name = meta.get("name", "")
        cluster = name if doc.get("kind") == "RayCluster" else f"{name}-{_RANDOM}"
    pods = []
    for role, node_type, group, template in _ray_groups(doc):
        ports = {p["name"]: p.get("containerPort")
                 for c in (template.get("spec") or {}).get("containers") or []
                 for p in c.get("ports") or [] if "name" in p}
        pods.append(Pod(role, _ray_node_labels(cluster, node_type, group, template),
                        meta.get("namespace"), ports))
    return pods


def submitter_pod(doc: dict, name: str | None = None) -> Pod | None:
    """The pod that runs `ray job submit` for a RayJob in K8sJobMode (the default), or None.

    KubeRay runs it as a Kubernetes Job named after the RayJob, and the Job controller labels
    the Job's pods with that name (KubeRay 1.7 adds ray.io/originated-from-*; 1.6 does not)."""
    spec = doc.get("spec") or {}
    if doc.get("kind") != "RayJob" or spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
        return None
    meta = doc.get("metadata") or {}
    name = name or meta.get("name", "")
    labels = dict(((spec.get("submitterPodTemplate") or {}).get("metadata") or {}).get("labels")
                  or {})
    labels.update({"batch.kubernetes.io/job-name": name, "job-name": name,
                   "batch.kubernetes.io/controller-uid": _RANDOM, "controller-uid": _RANDOM})
    return Pod(f"submitter pod (Job {name})", labels, meta.get("namespace"))


def label_selector_matches(selector: dict | None, labels: dict) -> bool:
    """Kubernetes LabelSelector semantics; an empty selector matches every pod."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, values = expr.get("key"), expr.get("values") or []
        has = key in labels
        if not {"In": has and labels.get(key) in values,
                "NotIn": not has or labels.get(key) not in values,
                "Exists": has, "DoesNotExist": not has}.get(expr.get("operator"), False):
            return False
    return True


def _selector_text(selector: dict | None) -> str:
    selector = selector or {}
    parts = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for e in selector.get("matchExpressions") or []:
        values = f" ({', '.join(map(str, e.get('values') or []))})" if e.get("values") else ""
        parts.append(f"{e.get('key')} {e.get('operator')}{values}")
    return "{" + ", ".join(parts) + "}"


def _peer_text(peer: dict) -> str:
    if "namespaceSelector" not in peer:
        return f"pods matching {_selector_text(peer.get('podSelector'))}"
    namespaces = f"namespaces matching {_selector_text(peer['namespaceSelector'])}"
    if "podSelector" not in peer:
        return f"every pod in {namespaces}"
    return f"pods matching {_selector_text(peer['podSelector'])} in {namespaces}"


def _peer_matches(peer: dict, pod: Pod, namespace: str | None) -> bool:
    """Whether a `from` peer admits `pod`; an ipBlock admits no pod by its labels."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        # Namespace labels are not in these files: the selector may match any namespace.
        return "podSelector" not in peer or label_selector_matches(peer["podSelector"], pod.labels)
    return pod.namespace == namespace and label_selector_matches(peer.get("podSelector"),
                                                                 pod.labels)


def _rule_ray_ports(rule: dict, pod: Pod) -> tuple[set[int], bool]:
    """Ray ports an ingress rule opens on `pod` (named ports resolved), and whether it opens
    every port."""
    opened: set[int] = set()
    for p in rule.get("ports") or [{}]:
        if str(p.get("protocol") or "TCP").upper() != "TCP":
            continue
        port = p.get("port")
        if port is None:
            return set(RAY_PORTS), True
        if isinstance(port, str):
            port = pod.ports.get(port) or (int(port) if port.isdigit() else None)
            if not isinstance(port, int):
                continue
        end = p.get("endPort") or port
        opened |= {q for q in RAY_PORTS if port <= q <= end}
    return opened, False


def _ingress_policies(policies: list[tuple[str, dict]], pod: Pod) -> list[tuple[str, dict]]:
    """The NetworkPolicies that restrict ingress to `pod`."""
    return [(where, p) for where, p in policies
            if (p.get("metadata") or {}).get("namespace") == pod.namespace
            and "Ingress" in ((p.get("spec") or {}).get("policyTypes") or ["Ingress"])
            and label_selector_matches((p.get("spec") or {}).get("podSelector"), pod.labels)]


def _admits(policies: list[tuple[str, dict]], pod: Pod, sender: Pod, port: int | None) -> bool:
    """Whether `sender` may connect to `pod` on `port` (None: on every port)."""
    for _, policy in _ingress_policies(policies, pod):
        for rule in (policy.get("spec") or {}).get("ingress") or []:
            opened, every = _rule_ray_ports(rule, pod)
            if not (every if port is None else port in opened):
                continue
            if not rule.get("from") or any(_peer_matches(peer, sender, pod.namespace)
                                           for peer in rule["from"]):
                return True
    return False


def _foreign_pods(doc: dict, others: list[dict]) -> list[Pod]:
    """Pods that must not reach the cluster: strangers, lookalikes, the folder's other clusters."""
    meta = doc.get("metadata") or {}
    namespace = meta.get("namespace")
    template_labels = {k: v for _, _, _, t in _ray_groups(doc)
                       for k, v in ((t.get("metadata") or {}).get("labels") or {}).items()}
    foreign = [Pod("any pod without labels", {}, namespace),
               Pod("any pod with the pod-template labels that is no Ray node", template_labels,
                   namespace),
               Pod("another Ray cluster's head pod",
                   _ray_node_labels("another-ray-cluster", "head", "headgroup", {}), namespace),
               Pod("another Ray cluster's worker pod",
                   _ray_node_labels("another-ray-cluster", "worker", "workers", {}), namespace),
               Pod("another RayJob's submitter pod", submitter_pod(
                   {"kind": "RayJob", "metadata": meta}, "another-rayjob").labels, namespace)]
    foreign += [Pod(f"the {p.role} pod of the same cluster name in another namespace", p.labels,
                    "another-namespace", p.ports) for p in kuberay_pods(doc)]
    if doc.get("kind") == "RayCluster":
        foreign += [Pod(f"the {p.role} pod of another RayCluster from the same manifest",
                        p.labels, p.namespace, p.ports)
                    for p in kuberay_pods(doc, f"{meta.get('name', '')}-copy")]
    for other in others:
        name = f"{other.get('kind')} {(other.get('metadata') or {}).get('name')}"
        foreign += [Pod(f"the {p.role} pod of {name}", p.labels, p.namespace, p.ports)
                    for p in kuberay_pods(other) + [submitter_pod(other)] if p is not None]
    return foreign


def _ports_text(ports: set[int], every: bool) -> str:
    ray = ", ".join(f"{p} ({RAY_PORTS[p]})" for p in sorted(ports))
    return f"every port, including {ray}" if every else ray


def _cluster_network_problems(where: str, doc: dict, policies: list[tuple[str, dict]],
                              others: list[dict]) -> list[str]:
    meta = doc.get("metadata") or {}
    name = f"{doc.get('kind')} {meta.get('name')}"
    own = kuberay_pods(doc)
    extra: list[Pod] = []  # admitted on 8265 only
    if doc.get("kind") == "RayJob":
        submitter = submitter_pod(doc)
        extra = ([submitter] if submitter else []) + [
            Pod("KubeRay operator", _OPERATOR_LABELS, meta.get("namespace"))]
    foreign = _foreign_pods(doc, others)
    problems: list[str] = []
    wrong: dict[tuple, list[str]] = {}  # (policy, rule, who, ports) -> roles of pods it opens
    for pod in own:
        selecting = _ingress_policies(policies, pod)
        if not selecting:
            problems.append(
                f"{where}: no NetworkPolicy selects the {pod.role} pod of {name} (ray.io/cluster="
                f"{pod.labels['ray.io/cluster']}, ray.io/node-type={pod.labels['ray.io/node-type']}"
                "): every pod in the Kubernetes cluster can reach its Ray ports")
            continue
        for policy_where, policy in selecting:
            for i, rule in enumerate((policy.get("spec") or {}).get("ingress") or []):
                ports, every = _rule_ray_ports(rule, pod)
                if not ports:
                    continue
                whos = [] if rule.get("from") else ["everyone (the rule has no `from`)"]
                for peer in rule.get("from") or []:
                    whos += [w for w in [_peer_problem(peer, pod, own, extra, foreign, ports)] if w]
                for who in whos:
                    wrong.setdefault((policy_where, i, who, _ports_text(ports, every)),
                                     []).append(pod.role)
    problems += [f"{policy_where}: ingress rule {i} lets {who} reach {ports} of {name} "
                 f"({', '.join(roles)}); only the cluster's own pods may"
                 + (", and its submitter and the KubeRay operator on 8265" if extra else "")
                 for (policy_where, i, who, ports), roles in wrong.items()]
    for pod in own:
        if not _ingress_policies(policies, pod):
            continue
        shut_out = [s.role for s in own if not _admits(policies, pod, s, None)]
        if shut_out:
            problems.append(f"{where}: the NetworkPolicies keep the {', '.join(shut_out)} pod(s) "
                            f"of {name} from its {pod.role} pod; a Ray cluster's pods must reach "
                            "one another on every port (the GCS on 6379, and ports Ray picks)")
    head = own[0]
    why = {"KubeRay operator": "KubeRay could not follow the job's status (select the operator "
                               "pod by app.kubernetes.io/component=kuberay-operator)"}
    if _ingress_policies(policies, head):
        problems += [f"{where}: the NetworkPolicies keep the {e.role} from 8265 on the head pod of "
                     f"{name}: " + why.get(e.role, "the study would never be submitted (select "
                                           "the submitter by batch.kubernetes.io/job-name)")
                     for e in extra if not _admits(policies, head, e, 8265)]
    return problems


def _peer_problem(peer: dict, pod: Pod, own: list[Pod], extra: list[Pod], foreign: list[Pod],
                  ports: set[int]) -> str | None:
    """Who a `from` peer wrongly admits to Ray `ports` of `pod`, or None if nobody."""
    if "ipBlock" in peer:
        cidr = (peer.get("ipBlock") or {}).get("cidr")
        return f"ipBlock {cidr}" + (" (every address)" if is_world(cidr) else " (not a pod "
                                    "identity: any pod or machine holding such an address)")
    strangers = [p.role for p in foreign if _peer_matches(peer, p, pod.namespace)]
    if strangers:
        return f"{_peer_text(peer)}, which also match {strangers[0]}"
    if not any(_peer_matches(peer, p, pod.namespace) for p in own + extra):
        return (f"{_peer_text(peer)}, which match none of its pods"
                + (", its submitter or the KubeRay operator" if extra else ""))
    helpers = [p.role for p in extra if _peer_matches(peer, p, pod.namespace)]
    if helpers and ports - {8265}:
        return f"{_peer_text(peer)} (the {helpers[0]}, which needs 8265 only)"
    return None


def network_policy_problems(docs: list[tuple[str, Any]]) -> list[str]:
    """Why a RayCluster/RayJob among `docs` ((where, document) pairs, e.g. all of a folder's)
    is not walled off by NetworkPolicies; [] if each is.

    Every pod of the cluster must be selected by a NetworkPolicy that restricts ingress; every
    rule of those policies that opens one of Ray's ports (6379, 8265, 10001) may admit only
    pods of the cluster itself (and for a RayJob its submitter and the KubeRay operator, on
    8265 only): no rule without `from`, no ipBlock, no selector that also matches a stranger,
    a lookalike in another namespace or another cluster of the folder. The cluster must still
    work: its pods admit one another on every port, a RayJob's head admits its submitter and
    the operator on 8265."""
    policies = [(where, d) for where, d in docs if is_network_policy(d)]
    clusters = [(where, d) for where, d in docs
                if is_kuberay(d) and d.get("kind") in ("RayCluster", "RayJob")]
    problems = []
    for where, doc in clusters:
        others = [d for _, d in clusters if d is not doc]
        try:
            problems += _cluster_network_problems(where, doc, policies, others)
        except (AttributeError, TypeError, KeyError, ValueError) as e:
            problems.append(f"{where}: cannot read its NetworkPolicies or pod templates ({e!r}); "
                            "fix the schema problems first")
    return problems


# ----------------------------------------------------------------------------- studies

_STUDY = re.compile(r"python3?\s+(studies/[\w-]+\.py)([^`\n|;&]*)")


def study_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, flags) of every `python studies/NAME.py ...` in a config or document."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [(m.group(1), re.findall(r"(?<!\S)(--[a-z][\w-]*)", m.group(2)))
            for m in _STUDY.finditer(joined)]


def study_commands_in_file(path: str | Path) -> list[tuple[str, list[str]]]:
    """`study_commands` of a file; YAML is parsed first so folded entrypoints read as one line."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        return [c for doc in load_documents(path) for s in _strings(doc)
                for c in study_commands(s)]
    return study_commands(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- folder

@dataclass
class FolderReport:
    ray_up_configs: list[Path]
    kuberay_manifests: list[Path]
    problems: list[str]
    kubernetes_manifests: list[Path] = field(default_factory=list)
    kubernetes_version: str | None = None


def check_folder(folder: str | Path) -> FolderReport:
    """All checks over every YAML file and shell script under `folder`."""
    folder = Path(folder)
    repo_root = folder.resolve().parent
    schema = ray_schema()
    report = FolderReport([], [], [])
    try:
        report.kubernetes_version = kubernetes_version()
    except ImportError:
        report.problems.append("cannot check Kubernetes manifests against Kubernetes' schema: "
                               "python -m pip install kubernetes-validate")
    all_docs: list[tuple[str, Any]] = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder.parent)
        if path.suffix in (".yaml", ".yml"):
            try:
                docs = load_documents(path)
            except yaml.YAMLError as e:
                report.problems.append(f"{rel}: not valid YAML ({e})")
                continue
            for i, doc in enumerate(docs):
                where = f"{rel}" if len(docs) == 1 else f"{rel}[{i}]"
                report.problems += [str(e) for e in find_exposures(doc, where)]
                if is_ray_up_config(doc):
                    report.ray_up_configs.append(path)
                    report.problems += [f"{where}: schema: {e}"
                                        for e in schema_errors(doc, schema)]
                if is_ray_up_config(doc) or is_kuberay(doc):
                    report.problems += token_auth_problems(doc, where, repo_root)
                if is_kuberay(doc) and path not in report.kuberay_manifests:
                    report.kuberay_manifests.append(path)
                if is_kubernetes_manifest(doc):
                    if path not in report.kubernetes_manifests:
                        report.kubernetes_manifests.append(path)
                    if report.kubernetes_version:
                        report.problems += [
                            f"{where}: Kubernetes {report.kubernetes_version} schema: {e}"
                            for e in kubernetes_schema_errors(doc, report.kubernetes_version)]
                all_docs.append((where, doc))
        elif path.suffix == ".sh":
            rules = gcloud_firewall_rules(path.read_text(encoding="utf-8"))
            report.problems += [str(e) for e in find_exposures(rules, f"{rel}")]
    report.problems += network_policy_problems(all_docs)
    return report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0]) if args else Path(__file__).resolve().parent
    report = check_folder(folder)
    for problem in report.problems:
        print(f"problem: {problem}")
    if report.problems:
        return 1
    print(f"ok: {len(report.ray_up_configs)} ray up configs, "
          f"{len(report.kuberay_manifests)} KubeRay manifests, "
          f"{len(report.kubernetes_manifests)} Kubernetes manifests: schema valid (Ray's, "
          f"Kubernetes {report.kubernetes_version}), nothing open to the internet, token auth "
          "on, every Ray cluster behind a NetworkPolicy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
