"""Offline checks of the Ray cluster configs in ``clusters/``.

Nothing here starts Ray, talks to a cloud or imports ``dilm_ray``:

* the launcher files (aws, gcp, local) are validated against the JSON schema the
  installed ray ships (``ray/autoscaler/ray-schema.json``), as written;
* they are then run through ray's own ``prepare_config`` + ``validate_config``,
  the first two steps of ``ray up``. This works offline for every provider:
  ``prepare_config`` only merges the provider's ``defaults.yaml`` shipped inside
  ray (and, for ``local``, turns head_ip/worker_ips into the single
  ``local.cluster.node`` type). The later cloud step of ``ray up`` (provider
  ``bootstrap_config`` and EC2 resource auto-detection) needs boto3 /
  google-api-python-client plus credentials and network, so it is not run;
* project conventions the schema cannot see (file_mounts, setup.sh, the
  dashboard flags, the Ray pin) and the shell syntax of every command;
* the KubeRay manifest is only parsed and checked (Kubernetes is not a
  launcher provider, so the launcher schema does not apply).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
LAUNCHERS = ["aws", "gcp", "local"]
CLOUDS = ["aws", "gcp"]
SCHEMA_PATH = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
VENV_BIN = "~/dilm-ray/.venv/bin"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / f"{name}.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    data = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validators.validator_for(data).check_schema(data)
    return data


def schema_errors(config: dict, schema: dict) -> list[str]:
    validator = jsonschema.validators.validator_for(schema)(schema)
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in validator.iter_errors(config))


def start_commands(config: dict) -> list[str]:
    return list(config["head_start_ray_commands"]) + list(config["worker_start_ray_commands"])


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    return [c for k in keys for c in config.get(k, [])] + start_commands(config)


# ---------------------------------------------------------------- launcher schema


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_matches_ray_schema(name, schema):
    config = load(name)
    assert isinstance(config, dict), f"{name}.yaml is not a YAML mapping"
    assert schema_errors(config, schema) == []


def _misspell_top_level(c):
    c["setup_comands"] = c.pop("setup_commands")


def _misspell_nested_key(c):
    node_types = c.get("available_node_types")
    if node_types:
        next(iter(node_types.values()))["min_worker"] = 0
    else:  # local: no node types, use another closed object instead
        c["auth"]["ssh_usr"] = c["auth"].pop("ssh_user")


def _wrong_type(c):
    c["max_workers"] = "6"


def _head_ip_at_top_level(c):
    if c["provider"]["type"] == "local":
        c["head_ip"] = c["provider"].pop("head_ip")
    else:
        c["region"] = c["provider"].pop("region")


MUTATIONS = {
    "misspelled-top-level-key": _misspell_top_level,
    "misspelled-nested-key": _misspell_nested_key,
    "wrong-type": _wrong_type,
    "provider-key-at-top-level": _head_ip_at_top_level,
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
@pytest.mark.parametrize("name", LAUNCHERS)
def test_schema_rejects_broken_copies(name, mutation, schema):
    """The checks above must bite: a typo'd copy of each file fails the schema."""
    broken = copy.deepcopy(load(name))
    MUTATIONS[mutation](broken)
    assert schema_errors(broken, schema), f"schema accepted {name}.yaml with {mutation}"


# ----------------------------------------------------- ray's own prepare/validate


@pytest.mark.parametrize("name", LAUNCHERS)
def test_ray_prepare_and_validate_config(name):
    raw = load(name)
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)

    node_types = prepared["available_node_types"]
    assert prepared["head_node_type"] in node_types
    assert prepared["head_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]
    assert prepared["worker_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]
    if name == "local":
        node = node_types["local.cluster.node"]
        n_ips = len(raw["provider"]["worker_ips"])
        assert node["min_workers"] == node["max_workers"] == min(n_ips, raw["max_workers"])
    else:
        head = node_types[prepared["head_node_type"]]
        assert head["max_workers"] == 0
        workers = [t for n, t in node_types.items() if n != prepared["head_node_type"]]
        assert sum(t["max_workers"] for t in workers) <= prepared["max_workers"]


@pytest.mark.parametrize("mutation", ["misspelled-top-level-key", "wrong-type", "provider-key-at-top-level"])
@pytest.mark.parametrize("name", LAUNCHERS)
def test_ray_rejects_broken_copies(name, mutation):
    broken = copy.deepcopy(load(name))
    MUTATIONS[mutation](broken)
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


# ------------------------------------------------------------ project conventions


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_project_conventions(name):
    config = load(name)
    assert config["cluster_name"] == "dilm-ray"
    # `ray up` from the repo root syncs the working tree; setup.sh installs it.
    assert config["file_mounts"] == {"~/dilm-ray": "."}
    assert ".venv" in config["rsync_exclude"]
    setup = " ; ".join(config["setup_commands"])
    assert "cd ~/dilm-ray" in setup and "bash scripts/setup.sh" in setup
    assert 'export PATH="$HOME/dilm-ray/.venv/bin:$PATH"' in setup

    # Head and worker client must run the Ray installed here (the one `ray up` uses).
    pins = set(re.findall(r"ray==([0-9][0-9A-Za-z.]*)", setup))
    assert pins == {ray.__version__}, f"setup pins ray {pins}, installed ray is {ray.__version__}"

    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head
    assert "--dashboard-host=0.0.0.0" in head  # Tune's ASHA clean-up needs the State API
    assert "--include-dashboard=false" not in head.lower()
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    workers = " ".join(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in workers
    for cmd in start_commands(config):
        assert cmd.startswith(f"{VENV_BIN}/ray stop") or "$HOME/dilm-ray/.venv/bin" in cmd, cmd


@pytest.mark.parametrize("name", CLOUDS)
def test_cloud_node_types(name):
    config = load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values()), "no GPU worker type"
    assert any(t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0 for t in workers.values())
    for n, t in workers.items():
        assert t.get("min_workers", 0) == 0, f"{n} should scale to zero"
        assert t["max_workers"] > 0, f"{n} can never start"
    # One image on every node type: Ray needs one Python minor version cluster-wide.
    if name == "aws":
        images = {t["node_config"]["ImageId"] for t in types.values()}
    else:
        images = {d["initializeParams"]["sourceImage"] for t in types.values() for d in t["node_config"]["disks"]}
    assert len(images) == 1, images


@pytest.mark.parametrize("name", LAUNCHERS)
def test_ray_start_flags_exist(name):
    """Every --flag given to `ray start` is an option of the installed ray's CLI."""
    from ray.scripts.scripts import start

    known = {opt for param in start.params for opt in param.opts}
    for cmd in start_commands(load(name)):
        for part in cmd.split(";"):
            tokens = shlex.split(part)
            if tokens[:1] and tokens[0].endswith("ray") and tokens[1:2] == ["start"]:
                flags = {t.split("=", 1)[0] for t in tokens[2:] if t.startswith("--")}
                assert flags, part
                assert flags <= known, f"unknown ray start flags {flags - known}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_commands_are_valid_bash(name):
    for cmd in all_commands(load(name)):
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{cmd!r}: {result.stderr}"


# ------------------------------------------------------------------------- KubeRay


def test_kuberay_manifest():
    docs = list(yaml.safe_load_all((CLUSTERS / "kuberay.yaml").read_text()))
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert "dilm-ray" in spec["entrypoint"] and "tune configs/mnli.yaml" in spec["entrypoint"]
    # KubeRay pastes the entrypoint into the submitter's shell line, so any
    # shell operator must be quoted (e.g. inside bash -c '...').
    lexer = shlex.shlex(spec["entrypoint"], posix=True, punctuation_chars=True)
    operators = [t for t in lexer if t and set(t) <= set("();<>|&")]
    assert operators == [], f"unquoted shell operators in entrypoint: {operators}"
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)

    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = cluster["workerGroupSpecs"]
    assert groups and all(g["maxReplicas"] >= g.get("minReplicas", 0) for g in groups)

    # Every Ray container (and initContainer) runs the Ray version KubeRay is told about.
    pod_specs = [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    images = [c["image"] for s in pod_specs for c in s["containers"] + s.get("initContainers", [])]
    tags = set()
    for image in images:
        match = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)", image)
        assert match, f"{image}: expected a rayproject/ray:<version>-... image (update this test if you bake your own)"
        tags.add(match.group(1))
    assert tags == {cluster["rayVersion"]}, (tags, cluster["rayVersion"])


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_kuberay_commands_are_valid_bash():
    job = yaml.safe_load((CLUSTERS / "kuberay.yaml").read_text())
    scripts = [shlex.split(job["spec"]["entrypoint"])[2]]
    cluster = job["spec"]["rayClusterSpec"]
    for s in [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]:
        scripts += [c["args"][0] for c in s.get("initContainers", [])]
    for script in scripts:
        result = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert result.returncode == 0, f"{script!r}: {result.stderr}"
