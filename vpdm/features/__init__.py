"""Features: the frozen pretrained backbone, its weights, and the feature cache."""
