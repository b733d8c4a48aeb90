"""Evaluation: feature networks (Inception, the digits judge), Frechet distance and scores, sample sets
on disk, `dumo-ray evaluate` and the in-training evaluation."""
