"""Errors that every retry would raise again (DeterministicError: a data or config error, the non-finite
stop) end a Ray Train run at once, with one line, and spend none of `distributed.max_failures`; any other
worker failure is still retried (tests/test_distributed.py, the fault drill)."""
import json
from pathlib import Path

import pytest

from dumo_ray.cli import main
from dumo_ray.data.latents import CorruptShardError
from dumo_ray.errors import FailFastPolicy
from dumo_ray.train.step import NonFiniteError

ROOT = Path(__file__).resolve().parents[1]


def test_the_policy_raises_deterministic_errors_and_retries_the_others():
    """Ray Train's own error objects (no Ray started): a deterministic error on any rank, even wrapped in a
    Ray task error (a Ray Data read), is raised at once; other errors get Ray's retries and then raise."""
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    policy = FailFastPolicy(FailureConfig(max_failures=2))
    diverged = WorkerGroupError("", {0: RuntimeError("gloo: connection reset"), 1: NonFiniteError("diverged")})
    assert policy.make_decision(diverged) == FailureDecision.RAISE
    shard = RayTaskError("ReadParquet", "traceback", CorruptShardError("latent shard a.parquet is corrupt"))
    assert policy.make_decision(WorkerGroupError("", {0: shard})) == FailureDecision.RAISE
    assert policy.make_decision(ControllerError(CorruptShardError("bad"))) == FailureDecision.RAISE
    # A crash that may not recur (a killed worker, the fault drill): max_failures retries, then raise.
    crash = WorkerGroupError("", {1: RuntimeError("injected failure")})
    assert [policy.make_decision(crash) for _ in range(3)] == [FailureDecision.RETRY] * 2 + [FailureDecision.RAISE]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_diverged_two_worker_run_stops_at_once_with_one_line(digits_latents, tmp_path, capsys):
    """The non-finite stop on both ranks of a DeepSpeed run (lr 1e30: the second step's loss overflows)
    with 2 restarts allowed: `dumo-ray train` exits 1 with the stop's message after one attempt. Rank 0
    writes one status row per step (log_every_images = the batch), so each attempt appends an image-32 row."""
    overrides = [f"data.path={digits_latents}", "model.preset=DuMo-Micro/2", "optim.batch_size=32", "optim.lr=1e30",
                 "distributed.num_workers=2", "distributed.max_failures=2", "distributed.max_nonfinite_steps=1",
                 "train.total_images=320", "train.log_every_images=32", "train.checkpoint_every_images=320",
                 f"train.storage_path={tmp_path / 'runs'}", "train.name=diverged", "tracking.enabled=false",
                 "eval.features=none"]
    code = main(["train", "--config", str(ROOT / "configs/quickstart.yaml"), *[a for o in overrides for a in ("--set", o)]])
    # stderr also carries the lines Ray streams from its actors; ours are the two `dumo-ray train:` lines.
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dumo-ray train:")]
    assert code == 1
    assert ours[0] == ("dumo-ray train: error: 1 consecutive steps had a NaN/Inf loss or gradient (last at image 64); "
                       "stopping. The last good checkpoint is kept.")
    rows = [json.loads(line) for line in (tmp_path / "runs" / "diverged" / "metrics.jsonl").read_text().splitlines()]
    assert [row["images"] for row in rows] == [32]  # one attempt: Ray Train restarted nothing
