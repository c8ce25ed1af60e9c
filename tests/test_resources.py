"""Resource requests are checked against the Ray cluster before anything starts: none can wait forever."""

import pytest

from uflow_batch.config import ConfigError
from uflow_batch.pipelines import cluster


@pytest.fixture
def two_cpu_node(monkeypatch):
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    monkeypatch.setattr(cluster.ray, "nodes", lambda: nodes)
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {"CPU": 2.0})


def test_a_request_a_live_node_can_hold_passes(two_cpu_node):
    cluster.check_fits("an actor", 2.0)
    cluster.check_fits("an actor", 0.5, 0.0)


@pytest.mark.parametrize("cpus, gpus", [(4.0, 0.0), (1.0, 1.0)])
def test_a_request_no_live_node_can_hold_is_a_configuration_error(two_cpu_node, cpus, gpus):
    with pytest.raises(ConfigError, match="no node of the Ray cluster has that much.*largest has 2 CPU and 0 GPU"):
        cluster.check_fits("an inference actor", cpus, gpus)


def test_a_gpu_asked_of_a_cluster_without_one_is_a_configuration_error(two_cpu_node):
    assert cluster.gpus_per_worker(None) == 0.0, "by default: one GPU where there are some, else CPU"
    with pytest.raises(ConfigError, match="ask for 0 GPUs"):
        cluster.gpus_per_worker(1.0)
