"""Experiment configs: one ml_collections file per experiment; defaults in base.py."""
