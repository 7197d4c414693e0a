"""Evaluation: metrics (AUROC, AUPRO, F1-max), scoring a test split, plots."""
