"""Elastic multi-node training on a real multi-node Ray cluster simulated on this machine
(`ray.cluster_utils.Cluster`: a head plus two worker nodes, each with its own raylet and object store).

The worker nodes carry a custom `trainer` resource and no CPUs, the way GPU nodes carry the GPUs: the
training workers (`distributed.worker_resources: {trainer: 1}`) can only run there, one per node, and
Ray Data's tasks stay on the head. A node is removed mid-run and added back; the run must continue on the
remaining node from its last checkpoint, scale back up, and end where an uninterrupted run ends.
"""
import json
import os
import threading
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from dumo_ray.config import load_config
from dumo_ray.train.launch import fit

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
TOTAL = BATCH * 240  # long enough that the run is still going when the node comes back
CHECKPOINT_EVERY = BATCH * 15
WORKER_NODE = {"num_cpus": 0, "resources": {"trainer": 1}}
# Both tests run on the multi-node cluster below (about half a minute to start alone).
pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Right after a node dies the controller may still count its resources and wait this long for a
    # worker that cannot start before it retries with fewer (Ray's default: 60 s; see cluster/README.md).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    if ray.is_initialized():
        ray.shutdown()  # the run's shared local Ray (conftest.local_ray); its next user starts it again
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    nodes = [cluster.add_node(**WORKER_NODE) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def elastic_config(latents, tmp_path, name, *extra):
    return load_config(ROOT / "configs/quickstart.yaml", [
        f"data.path={latents}", "model.preset=DuMo-Micro/2", f"optim.batch_size={BATCH}", "optim.lr=3e-3",
        f"train.total_images={TOTAL}", f"train.log_every_images={BATCH * 2}",
        f"train.checkpoint_every_images={CHECKPOINT_EVERY}", "train.keep_checkpoints=50",
        "train.num_sample_images=10", f"train.storage_path={tmp_path / 'runs'}", f"train.name={name}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "eval.features=none", "distributed.num_workers=[1, 2]",
        "distributed.cpus_per_worker=0", "distributed.worker_resources={trainer: 1}", "distributed.placement_strategy=SPREAD",
        "distributed.elastic_resize_interval_s=1", "distributed.max_failures=5", *extra])


def checkpoint_states(run_dir: Path) -> list[dict]:
    states = []
    for path in run_dir.glob("checkpoint_*/state.json"):
        try:
            states.append(json.loads(path.read_text()))
        except (json.JSONDecodeError, OSError):
            pass  # being written
    return sorted(states, key=lambda s: s["images"])


def wait_for(condition, what: str, running: threading.Thread, timeout: float = 240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if not running.is_alive():
            raise AssertionError(f"the run ended before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def logged_points(cfg, run_id: str) -> list:
    """(images, wall time in s) of every `loss` point rank 0 logged, in logging order."""
    history = MlflowClient(cfg.tracking.uri).get_metric_history(run_id, "loss")
    return sorted(((m.step, m.timestamp / 1000) for m in history), key=lambda p: p[1])


def test_elastic_run_loses_a_node_continues_and_scales_back_up(cluster, digits_latents, tmp_path, capfd):
    cluster_handle, (node_a, node_b) = cluster
    cfg = elastic_config(digits_latents, tmp_path, "elastic")
    run_dir = Path(cfg.run_dir)
    outcome = {}
    trainer = threading.Thread(target=lambda: outcome.update(result=fit(cfg)), daemon=True)
    trainer.start()

    # 1. Two workers, one on each worker node.
    first = wait_for(lambda: [s for s in checkpoint_states(run_dir) if s["world_size"] == 2], "a checkpoint by 2 workers", trainer)[0]
    assert sorted(first["nodes"]) == sorted([node_a.node_id, node_b.node_id])
    run_id = first["mlflow_run_id"]

    # 2. Lose node b mid-run (after a few more logged steps).
    wait_for(lambda: max((p[0] for p in logged_points(cfg, run_id)), default=0) >= first["images"] + 4 * BATCH,
             "training past the first checkpoint", trainer)
    images_at_loss = max(p[0] for p in logged_points(cfg, run_id))
    lost_at = time.time()
    cluster_handle.remove_node(node_b)

    # 3. Training goes on with one worker on node a, from the last checkpoint, resharded.
    alone = wait_for(lambda: [s for s in checkpoint_states(run_dir) if s["world_size"] == 1], "a checkpoint by 1 worker", trainer)[0]
    assert alone["nodes"] == [node_a.node_id]
    resumed_from = max(s["images"] for s in checkpoint_states(run_dir) if s["world_size"] == 2 and s["images"] <= images_at_loss)
    # The restart recomputes the steps since `resumed_from`; MLflow gets each step once, so the first point
    # logged after the loss is a new one, past the last step logged before it.
    points = logged_points(cfg, run_id)
    back = [p for p in points if p[1] > lost_at]
    assert back, "no step logged after the restart"
    assert back[0][0] > images_at_loss and len({p[0] for p in points}) == len(points)
    recovery_s, images_lost = back[0][1] - lost_at, images_at_loss - resumed_from
    assert 0 <= images_lost < CHECKPOINT_EVERY + 4 * BATCH

    # 4. A node comes back: the run scales up to two workers again.
    node_c = cluster_handle.add_node(**WORKER_NODE)
    regrown = wait_for(lambda: [s for s in checkpoint_states(run_dir) if s["world_size"] == 2 and s["images"] > alone["images"]],
                       "a checkpoint by 2 workers after the node came back", trainer)[0]
    assert sorted(regrown["nodes"]) == sorted([node_a.node_id, node_c.node_id])

    trainer.join(timeout=600)
    result = outcome["result"]
    assert result.error is None
    # The same end as an uninterrupted run: the image counter and the step count.
    assert result.metrics["images"] == TOTAL and result.metrics["step"] == TOTAL // BATCH
    final = checkpoint_states(run_dir)[-1]
    assert (final["images"], final["step"]) == (TOTAL, TOTAL // BATCH)
    assert (run_dir / "export" / "model.safetensors").exists()
    # The workers said what changed: the same global batch, shared differently, the ZeRO state resharded.
    log = capfd.readouterr().out
    assert "worker count changed 2 -> 1: global batch 32 = 2 workers x 16 becomes global batch 32 = 1 worker x 32" in log
    assert "worker count changed 1 -> 2: global batch 32 = 1 worker x 32 becomes global batch 32 = 2 workers x 16" in log
    print(f"\nrecovery (node lost -> first new step logged): {recovery_s:.1f} s; images recomputed: {images_lost} "
          f"(lost at {images_at_loss}, resumed from {resumed_from}); checkpoint every {CHECKPOINT_EVERY}")


def test_in_memory_data_order_does_not_depend_on_the_number_of_workers(cluster):
    import numpy as np
    import torch

    from dumo_ray.data.batch_plan import BatchPlan
    from dumo_ray.data.codec import LatentCodec
    from dumo_ray.data.loader import LatentBatches

    rows = 96
    ds = ray.data.from_items([{"label": i, "moments": np.zeros((2, 1, 2, 2), np.float16)} for i in range(rows)]).materialize()

    def labels_per_step(world, start_step=0, count=20):
        loaders = [iter(LatentBatches(ds.iterator(), plan=BatchPlan(10, world, rank, micro_batch_limit=2), rows=rows,
                                      seed=0, shuffle_buffer=0, codec=LatentCodec("none", (0.0,), (1.0,), (1, 2, 2)),
                                      device=torch.device("cpu"), start_step=start_step, in_memory=True))
                   for rank in range(world)]
        return [[int(y) for loader in loaders for micro, _ in next(loader) for y in micro["y"]] for _ in range(count)]

    one = labels_per_step(1)  # 9 steps of 10 per epoch of 96 rows: 20 steps cross two epoch boundaries
    assert labels_per_step(2) == one and labels_per_step(3) == one
    assert labels_per_step(3, start_step=7, count=13) == one[7:]  # resumed at another world size
    first_epoch = [y for step in one[:9] for y in step]
    assert len(set(first_epoch)) == 90 and one[9] != one[0]  # nothing repeats within an epoch; epochs reshuffle
