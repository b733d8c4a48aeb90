"""Datasets: VAE latents (or pixels) in Parquet, how they are made, checked and read for training.

- latents.py: the format, Parquet shards + `manifest.json` (schema, per-channel statistics), and the
  verified shard reads (torch-free: Ray Data's read tasks run them).
- codec.py: `LatentCodec`, how model space maps to stored latents and to images (travels with every
  checkpoint and export).
- loader.py: training batches from those shards, through Ray Data (`latent_dataset`) or read whole by
  one process (`read_latents`), cut per worker and step by `LatentBatches`, the posterior sample
  normalised just in time.
- batch_plan.py: how one global batch is shared out over the workers (and their micro-batches).
- images.py, precompute_stages.py: image trees, decoding and center crop, and the Ray Data stages of the
  latent precompute (composed in `pipelines/precompute_latents.py`).
- verify.py: `dumo-ray verify-latents`, shards checked against the manifest.
- digits.py: scikit-learn's bundled 8x8 digits, the demo dataset (as arrays, or as a PNG tree to
  precompute).
"""
