"""Deployment: one exported graph (ONNX, OpenVINO) and the runtimes that run it."""
