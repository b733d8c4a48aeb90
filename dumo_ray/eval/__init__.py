"""Evaluation: Frechet distances, the digits judge, image grids."""
