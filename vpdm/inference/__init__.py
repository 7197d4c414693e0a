"""Inference: the Detector (images in, scores and maps out), checkpoints, scored folders."""
