"""Experiments that reproduce the Switch Transformer findings and routing ablations at small scale."""
