import pytest
import torch

from dumo_ray.data.batch_plan import BatchPlan


@pytest.mark.parametrize("batch,world,limit", [(128, 1, None), (128, 2, None), (128, 3, None), (10, 4, 2), (256, 7, 16)])
def test_shares_cover_the_global_batch_once(batch, world, limit):
    plans = [BatchPlan(batch, world, r, limit) for r in range(world)]
    covered = [i for p in plans for i in range(p.offset, p.offset + p.share(p.rank))]
    assert covered == list(range(batch))
    assert all(sum(p.micro_batches) == p.share(p.rank) for p in plans)
    assert len({p.accumulation for p in plans}) == 1
    if limit:
        assert max(max(p.micro_batches) for p in plans) <= limit


def test_weights_give_the_global_mean_for_uneven_shares():
    """sum over workers of (1/accumulation) sum_micro weight * mean_micro / world = the mean over all B."""
    losses = torch.arange(10, dtype=torch.float64) ** 2
    world = 3
    total = 0.0
    for rank in range(world):
        plan = BatchPlan(10, world, rank, micro_batch_limit=2)
        start = plan.offset
        for size in plan.micro_batches:
            total += plan.weight(size) * losses[start:start + size].mean() / plan.accumulation / world
            start += size
    assert total == pytest.approx(float(losses.mean()))


def test_even_split_has_unit_weights_and_describes_itself():
    plan = BatchPlan(128, 2, 1)
    assert plan.micro_batches == [64] and plan.weight(64) == 1.0
    assert BatchPlan(128, 3, 0, 32).describe() == "global batch 128 = 3 workers x 43/42 (2 accumulated micro-batches of <= 22)"
    with pytest.raises(ValueError, match="cannot give each of 4 workers"):
        BatchPlan(3, 4, 0)
