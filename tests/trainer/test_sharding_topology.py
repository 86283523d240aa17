"""The planner knows the node: Topology through TorchRec's TopologyFactory with the job's local world
size and the device's memory (or the config's), checked on a real plan for 2 nodes x 8 GPUs
(world 16, local 8) without any multi-node run: TorchRec's planner runs on one process."""
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints

from trainer.sharding import GIB, build_topology

CUDA = torch.device("cuda")


def _plan(topology, sharding_type, tables=4):
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=f"t{i}", embedding_dim=64, num_embeddings=1_000_000,
                                                            feature_names=[f"f{i}"]) for i in range(tables)],
                                 device=torch.device("meta"))
    constraints = {f"t{i}": ParameterConstraints(sharding_types=[sharding_type], compute_kernels=["fused"])
                   for i in range(tables)}
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.plan(ebc, [EmbeddingBagCollectionSharder()]).plan[""]


def _shards(ps):
    return [(s.placement.rank(), str(s.placement.device())) for s in ps.sharding_spec.shards]


def test_two_nodes_of_eight_are_planned_as_two_hosts(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")   # what torchrun sets on each node
    topo = build_topology(16, CUDA, hbm_cap_bytes=80 * GIB, ddr_cap_bytes=200 * GIB)
    assert (topo.world_size, topo.local_world_size, topo.compute_device) == (16, 8, "cuda")
    assert len(topo.devices) == 16 and all(d.storage.hbm == 80 * GIB and d.storage.ddr == 200 * GIB
                                           for d in topo.devices)
    plan = _plan(topo, "table_row_wise")
    hosts_used = set()
    for name, ps in plan.items():
        shards = _shards(ps)
        ranks = {r for r, _ in shards}
        hosts = {r // 8 for r in ranks}
        # table-row-wise keeps a table's row shards on one host (NVLink, not the network) ...
        assert len(hosts) == 1 and len(ranks) == 8, (name, shards)
        # ... and places rank r on the local GPU r % 8 of its node
        assert all(dev == f"cuda:{r % 8}" for r, dev in shards), shards
        hosts_used |= hosts
    assert hosts_used == {0, 1}, "the tables are spread over both nodes"


def test_without_the_node_layout_one_host_of_16_is_assumed():
    """Control: the old construction (no local world size) plans a 16-GPU host: a table-row-wise table
    spans both nodes and rank 9 is sent to a cuda:9 that no node has."""
    topo = build_topology(16, CUDA, local_world_size=16)
    shards = [s for ps in _plan(topo, "table_row_wise").values() for s in _shards(ps)]
    assert any(dev == "cuda:9" for _, dev in shards)


def test_capacities_come_from_the_host_or_the_config(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    import os

    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    topo = build_topology(2, torch.device("cpu"), local_world_size=2)
    assert topo.devices[0].storage.ddr == host // 2 and topo.devices[0].storage.hbm == 0
    assert build_topology(2, torch.device("cpu"), local_world_size=2, ddr_cap_bytes=GIB).devices[1].storage.ddr == GIB
    assert build_topology(4, torch.device("cpu")).local_world_size == 4   # no torchrun: one node


def test_a_world_that_is_not_whole_nodes_is_refused():
    with pytest.raises(ValueError, match="world size 12 is not a whole number of nodes of 8 local ranks"):
        build_topology(12, CUDA, local_world_size=8)
