"""A run's config: YAML to typed, validated sections (each component's own, gathered in RunConfig), overrides,
the checks across sections, and the reference page generated from the dataclasses."""
from dist_dml.config.run import (ConfigError, RunConfig, apply_overrides, build_config, dump_yaml, load_config,
                                 validate)
from dist_dml.config.sections import CheckpointConfig, TrackingConfig, TrainConfig

__all__ = ["ConfigError", "RunConfig", "apply_overrides", "build_config", "dump_yaml", "load_config", "validate",
           "CheckpointConfig", "TrackingConfig", "TrainConfig"]
