"""Datasets: the bundled digits demo (pixel space) and, later, VAE latents in Parquet."""
