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
