"""Loading a DeepSpeed ZeRO checkpoint at another world size (elastic runs).

ZeRO partitions the optimizer state over the data-parallel ranks, and DeepSpeed refuses to load a
checkpoint saved by a different number of ranks. Its universal checkpoint format stores every
parameter's fp32 weight and Adam moments whole; a run that resumes at another world size converts the
saved checkpoint with DeepSpeed's own `ds_to_universal` and loads that (config `load_universal`), which
re-partitions the state for the new ranks. The conversion runs once per node (`universal_copy_on_node`):
it holds whole fp32 parameters and Adam moments in host memory, and eight workers of a node converting
DuMo-XL/2's ~8 GB of optimizer state side by side would need eight times that. The converter unpickles
the shards weights-only (train.checkpoint.restricted_unpickling), as the direct load does.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import re
import shutil
import tempfile
import time
import types
from pathlib import Path
from typing import Iterator

from dumo_ray.train.checkpoint import deepspeed_safe_globals, restricted_unpickling

OPTIMIZER_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_world_size(tag_dir: str | Path) -> int:
    """The data-parallel world size a ZeRO checkpoint was saved at: one optimizer shard per rank."""
    ranks = {int(m.group(1)) for p in Path(tag_dir).iterdir() if (m := OPTIMIZER_SHARD.search(p.name))}
    if not ranks:
        raise FileNotFoundError(f"no ZeRO optimizer shards (zero_pp_rank_*_optim_states.pt) in {tag_dir}")
    return max(ranks) + 1


def convert_to_universal(tag_dir: str | Path, out_dir: str | Path) -> float:
    """Writes the universal form of the checkpoint in `tag_dir` to `out_dir` (same tag name inside);
    returns the seconds it took. DeepSpeed's converter prints per-parameter progress; that goes nowhere."""
    from deepspeed.checkpoint import ds_to_universal

    started = time.perf_counter()
    args = types.SimpleNamespace(input_folder=str(tag_dir), output_folder=str(out_dir), num_extract_workers=1,
                                 num_merge_workers=1, keep_temp_folder=False, strict=True,
                                 inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), restricted_unpickling(tag_dir, deepspeed_safe_globals()):
        ds_to_universal.main(args)  # in this process (one worker each): the restriction holds there
    return time.perf_counter() - started


@contextlib.contextmanager
def universal_copy_on_node(tag_dir: Path, key: str, converts: bool) -> Iterator[tuple[Path, float | None]]:
    """Yields (folder holding the universal form of `tag_dir` under the same tag name, seconds the
    conversion took or None). The worker with `converts` (local rank 0) writes it into a node-local
    folder named after `key` (the checkpoint and the new world size, the same on every worker); all
    workers wait for it at a barrier, load, and meet again before the converter deletes it."""
    import torch.distributed as dist

    def barrier():
        if dist.is_initialized():
            dist.barrier()

    folder = Path(tempfile.gettempdir()) / f"dumo-universal-{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    seconds = None
    try:
        if converts:
            shutil.rmtree(folder, ignore_errors=True)  # left by an attempt that died mid-conversion
            seconds = convert_to_universal(tag_dir, folder / Path(tag_dir).name)
        barrier()
        yield folder, seconds
        barrier()
    finally:
        if converts:
            shutil.rmtree(folder, ignore_errors=True)
