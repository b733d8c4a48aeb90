"""The DiT size table: plain numbers, no torch, so the config can check a preset name without importing
the model (the config sits below the models in the import order)."""
from __future__ import annotations

# DiT shapes (Peebles & Xie); "tiny" presets are for tests and CPU demos.
PRESETS: dict[str, dict[str, int]] = {
    "DuMo-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "DuMo-L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "DuMo-B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "DuMo-S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "DuMo-Mini/2": dict(depth=3, hidden_size=192, num_heads=6, patch_size=2),  # 4x Tiny: 2.3M on the digits
    "DuMo-Tiny/2": dict(depth=3, hidden_size=96, num_heads=4, patch_size=2),  # digits quickstart, 0.6M
    "DuMo-Mini/4": dict(depth=3, hidden_size=192, num_heads=6, patch_size=4),  # Fashion-MNIST 32x32 on CPU: 64 tokens
    "DuMo-Tiny/4": dict(depth=3, hidden_size=96, num_heads=4, patch_size=4),
    "DuMo-Micro/2": dict(depth=2, hidden_size=32, num_heads=2, patch_size=2),  # unit tests
}
