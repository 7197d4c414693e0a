"""Decisions: thresholds, normalised scores, labels and masks, and calibrating them."""
