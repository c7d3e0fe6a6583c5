"""The configuration: schema.py (the frozen dataclass tree), load.py (YAML, environment and
`--section.key=value`, coercion by the type hints), check.py (values and their relations), docs.py
(--help text, docs/config.md, the start-up summary). `from trainer.config import X` names them all."""

from trainer.config.check import check
from trainer.config.docs import (
                                 field_docs,
                                 format_value,
                                 help_text,
                                 key_rows,
                                 markdown,
                                 section_doc,
                                 sections,
                                 summary,
                                 type_name,
)
from trainer.config.load import (
                                 ENV_KEYS,
                                 ConfigError,
                                 Written,
                                 get,
                                 load_config,
                                 load_config_tree,
                                 missing_packages,
                                 read_yaml,
                                 replace,
                                 to_dict,
                                 to_yaml,
)
from trainer.config.schema import (
                                 PRESETS,
                                 SHAPE_KEYS,
                                 CheckpointConfig,
                                 Config,
                                 DataConfig,
                                 ModelConfig,
                                 Preset,
                                 RunConfig,
                                 SampleConfig,
                                 SftConfig,
                                 Shape,
                                 StorageConfig,
                                 TokenizerConfig,
                                 TrainConfig,
                                 model_label,
                                 model_shape,
                                 preset_changes,
                                 shape_overrides,
)

__all__ = ["ENV_KEYS", "PRESETS", "SHAPE_KEYS", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
           "ModelConfig", "Preset", "RunConfig", "SampleConfig", "SftConfig", "Shape", "StorageConfig",
           "TokenizerConfig", "TrainConfig", "Written", "check", "field_docs", "format_value", "get", "help_text",
           "key_rows", "load_config", "load_config_tree", "markdown", "missing_packages", "model_label",
           "model_shape", "preset_changes", "read_yaml", "replace", "section_doc", "sections", "shape_overrides",
           "summary", "to_dict", "to_yaml", "type_name"]
