"""Loading never runs a pickle's code: DeepSpeed's ZeRO shards load weights-only on a resume (direct and
through the universal conversion), a tampered shard is refused naming the file, and the Inception weights
file is refused unless it is the official one (its SHA-256), before anything unpickles it."""
import ast
import gc
import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dumo_ray.digests import DigestMismatchError, file_sha256

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4


class FileDropper:
    """A pickle whose loading creates `path` (open(path, "w")): what a tampered checkpoint could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_engine(stage: int, load_universal: bool = False):
    from dumo_ray.config import Config, DistributedConfig, OptimConfig
    from dumo_ray.data.batch_plan import BatchPlan
    from dumo_ray.train.deepspeed_engine import deepspeed_config, import_deepspeed

    deepspeed = import_deepspeed(False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = Config(optim=OptimConfig(batch_size=GLOBAL_BATCH), distributed=DistributedConfig(zero_stage=stage))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg, BatchPlan(GLOBAL_BATCH, 1, 0), load_universal))
    return engine


def adam_moments(engine) -> torch.Tensor:
    state = next(iter(engine.optimizer.optimizer.state.values()))
    return torch.cat([state["exp_avg"].flatten(), state["exp_avg_sq"].flatten()]).clone()


def resume_worker(rank, port, stage, directory, result):
    """One DeepSpeed process (gloo): train, save, resume directly and through the universal format, then
    resume from a copy whose optimizer shard was replaced by a pickle that drops a file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from dumo_ray.train.checkpoint import UnsafeCheckpointError
    from dumo_ray.train.deepspeed_backend import load_engine_checkpoint
    from dumo_ray.train.deepspeed_engine import import_deepspeed
    from dumo_ray.train.reshard import convert_to_universal

    import_deepspeed(False).init_distributed(dist_backend="gloo")
    directory = Path(directory)
    engine = build_engine(stage)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        engine.backward(engine(torch.randn(GLOBAL_BATCH, 8, generator=g)).square().mean())
        engine.step()
    engine.save_checkpoint(str(directory / "saved"), tag="deepspeed")
    saved = ({k: v.clone() for k, v in engine.module.state_dict().items()}, adam_moments(engine))

    outcome = {}
    resumed = build_engine(stage)
    load_engine_checkpoint(resumed, directory / "saved")
    outcome["direct"] = (resumed.module.state_dict(), adam_moments(resumed))
    convert_to_universal(directory / "saved" / "deepspeed", directory / "universal" / "deepspeed")
    universal = build_engine(stage, load_universal=True)
    load_engine_checkpoint(universal, directory / "universal")
    outcome["universal"] = (universal.module.state_dict(), adam_moments(universal))

    shard = next((directory / "saved" / "deepspeed").glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": FileDropper(directory / "dropped")}, shard)
    try:
        load_engine_checkpoint(build_engine(stage), directory / "saved")
        outcome["tampered"] = "loaded"
    except UnsafeCheckpointError as error:
        outcome["tampered"] = str(error)
    try:  # a resume at another world size converts the shards first: refused there too
        convert_to_universal(directory / "saved" / "deepspeed", directory / "universal2" / "deepspeed")
        outcome["tampered_conversion"] = "converted"
    except UnsafeCheckpointError as error:
        outcome["tampered_conversion"] = str(error)
    outcome["force_env_after"] = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    torch.save({"saved": saved, **outcome}, result)
    del engine, resumed, universal
    gc.collect()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_a_resume_loads_weights_only_and_refuses_a_tampered_shard(tmp_path, stage):
    result = tmp_path / "result.pt"
    mp.spawn(resume_worker, args=(free_port(), stage, str(tmp_path), str(result)), nprocs=1)
    out = torch.load(result)
    weights, moments = out["saved"]
    for kind in ("direct", "universal"):
        got_weights, got_moments = out[kind]
        assert all(torch.equal(got_weights[k], v) for k, v in weights.items()), kind
        assert torch.equal(got_moments, moments), kind
    shard = next((tmp_path / "saved" / "deepspeed").glob("*optim_states.pt"))
    refused = f"refusing to unpickle {shard} (WeightsUnpickler error: Unsupported global: GLOBAL io.open)"
    assert refused in out["tampered"]
    assert "\n" not in out["tampered"]
    assert out["tampered_conversion"].startswith(f"refusing to unpickle {shard} (")
    assert not (tmp_path / "dropped").exists()  # the pickle's code never ran
    assert out["force_env_after"] is None  # the override ends with the load
    # The tampered file is live: an unrestricted load would have run it.
    torch.load(shard, weights_only=False)
    assert (tmp_path / "dropped").exists()


def test_every_torch_load_in_the_package_is_weights_only():
    """Our own loads: every `torch.load(...)` call in dumo_ray/ passes weights_only=True."""
    calls = []
    for path in (ROOT / "dumo_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", keywords.get("weights_only")))
    assert calls, "found no torch.load call at all: the scan is broken"
    assert [where for where, weights_only in calls if weights_only != "True"] == []


def test_a_wrong_inception_weights_file_is_refused_before_it_is_unpickled(tmp_path, monkeypatch):
    from dumo_ray.eval.features import INCEPTION_SHA256, InceptionFeatures

    monkeypatch.delenv("DUMO_INCEPTION_SHA256", raising=False)
    fake = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"state": FileDropper(tmp_path / "dropped")}, fake)
    with pytest.raises(DigestMismatchError) as caught:
        InceptionFeatures(fake)
    message = str(caught.value)
    assert message == (f"Inception weights file {fake} has SHA256 {file_sha256(fake)}, the official "
                       f"weights-inception-2015-12-05-6726825d.pth has {INCEPTION_SHA256}: a truncated, corrupted or "
                       f"different file")
    assert not (tmp_path / "dropped").exists()


def test_inception_weights_of_your_own_are_loaded_weights_only(tmp_path, monkeypatch):
    """$DUMO_INCEPTION_SHA256 vouches for another file; torch-fidelity's weights_only=False load of it still
    runs weights-only."""
    from dumo_ray.eval.features import InceptionFeatures

    fake = tmp_path / "mine.pth"
    torch.save({"state": FileDropper(tmp_path / "dropped")}, fake)
    monkeypatch.setenv("DUMO_INCEPTION_SHA256", file_sha256(fake))
    with pytest.raises(Exception, match=re.escape("Unsupported global: GLOBAL io.open")):
        InceptionFeatures(fake)
    assert not (tmp_path / "dropped").exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
