import pytest
import torch

from dumo_ray.models import build_model


def randomize(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (the zero-initialised heads would make every derivative 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def micro_model():
    torch.manual_seed(0)
    return build_model("DuMo-Micro/2", input_size=8, in_channels=1, num_classes=10)


@pytest.fixture
def random_micro_model(micro_model):
    return randomize(micro_model)
