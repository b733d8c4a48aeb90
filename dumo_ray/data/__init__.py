"""Datasets: VAE latents (or pixels) in Parquet, how they are made, checked and read for training.

- latents.py: the format, Parquet shards + `manifest.json` (schema, per-channel statistics, the
  posterior sample normalised just in time).
- loader.py: training batches from those shards through Ray Data (`latent_dataset`, `LatentBatches`).
- images.py, precompute_stages.py: image trees, decoding and center crop, and the Ray Data stages of the
  latent precompute (composed in `pipelines/precompute_latents.py`).
- verify.py: `dumo-ray verify-latents`, shards checked against the manifest.
- digits.py: scikit-learn's bundled 8x8 digits, the demo dataset (as tensors, or as a PNG tree to
  precompute); batches.py: seeded batches of in-memory tensors (the single-process trainer).
"""
