"""Configuration: the typed settings of a run, presets, overrides, and configs of earlier versions."""
