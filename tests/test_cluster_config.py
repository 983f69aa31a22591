"""cluster.yaml is a valid Ray cluster config (Ray's own schema) and keeps the dashboard private."""

from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


def test_cluster_yaml_passes_rays_schema():
    # what `ray up` does: fill the provider's defaults, then validate against ray-schema.json
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)  # raises jsonschema.ValidationError on any unknown or ill-typed field
    assert config["head_node_type"] in config["available_node_types"]


def test_rays_schema_rejects_a_typo_in_our_config():
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    config["available_node_types"]["gpu_worker"]["min_wokers"] = 0  # the check is not vacuous
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def test_dashboard_bound_to_localhost():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start


def test_ray_up_nodes_use_token_authentication():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if " start " in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert "~/.ray/auth_token" in config["file_mounts"]  # the same token on every node


# ---------------------------------------------------------------- KubeRay

KUBERAY = CLUSTER_YAML.parent / "deploy" / "kuberay"


def _ray_cluster_crs() -> dict[str, dict]:
    """The RayCluster of raycluster.yaml and the one rayjob.yaml starts, as RayCluster custom resources."""
    cluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    return {"raycluster": cluster,
            "rayjob": {"metadata": job["metadata"], "spec": job["spec"]["rayClusterSpec"]}}


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_kuberay_clusters_pass_rays_own_reader_and_schema(name):
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = _ray_cluster_crs()[name]
    config = _derive_autoscaling_config_from_ray_cr(cr)  # what Ray's KubeRay autoscaler does; validates the schema
    gpu = config["available_node_types"]["gpu"]
    assert gpu["resources"].get("GPU") == 1 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert config["available_node_types"]["headgroup"]["resources"].get("CPU", 0) == 0  # the head does not train
    assert config["idle_timeout_minutes"] == 10


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_kuberay_clusters_keep_the_dashboard_private_and_use_tokens(name):
    spec = _ray_cluster_crs()[name]["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert labels == {"app": "cxr-search"}  # what networkpolicy.yaml admits
        for container in pod["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "cxr-search-ray-token"
    policy = yaml.safe_load((KUBERAY / "networkpolicy.yaml").read_text())
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app": "cxr-search"}}}]}]


def test_the_rayjob_stores_the_experiment_remotely():
    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    assert "--storage s3://" in job["spec"]["entrypoint"] and "--address auto" in job["spec"]["entrypoint"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_the_image_installs_the_pinned_versions():
    dockerfile = (CLUSTER_YAML.parent / "deploy" / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -c constraints.txt ." in dockerfile
