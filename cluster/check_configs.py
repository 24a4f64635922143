"""Static checks for the cluster configs in this folder; run after editing, before launching.

    python cluster/check_configs.py [FOLDER]

- every `ray up` config validates against the JSON schema shipped inside the installed ray;
- no firewall rule, security group, Kubernetes Service or Ingress opens anything to the whole
  internet (0.0.0.0/0 or ::/0), least of all Ray's GCS (6379), dashboard/jobs API (8265) or
  client (10001) ports: an unauthenticated jobs API is remote code execution for anyone who
  reaches it, and a token only helps if it cannot be brute-forced from the whole internet;
- Ray token authentication (RAY_AUTH_MODE=token) is on in every cluster, the token comes from
  a file outside the repository or a Kubernetes Secret, and no token literal is written here.

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
from dataclasses import dataclass
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


def check_folder(folder: str | Path) -> FolderReport:
    """All checks over every YAML file and shell script under `folder`."""
    folder = Path(folder)
    repo_root = folder.resolve().parent
    schema = ray_schema()
    report = FolderReport([], [], [])
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
        elif path.suffix == ".sh":
            rules = gcloud_firewall_rules(path.read_text(encoding="utf-8"))
            report.problems += [str(e) for e in find_exposures(rules, f"{rel}")]
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
          f"{len(report.kuberay_manifests)} KubeRay manifests: schema valid, nothing open to "
          "the internet, token auth on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
