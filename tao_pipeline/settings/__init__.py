"""One typed settings object for the whole pipeline, and the one way to load it.

``sections`` holds the typed sections and their defaults, ``loader`` reads a TOML file plus
dotted overrides (:func:`load_settings`, :class:`SettingsSource`), and ``vocabulary`` names the
scorers and extractors a setting may mention. This package imports no other part of the project
but the demo's file paths, so every layer can depend on it.
"""

from tao_pipeline.settings.loader import (
    CONFIG_ENV,
    OVERRIDES_ENV,
    SettingsError,
    SettingsSource,
    default_config_file,
    load_settings,
    parse_override,
)
from tao_pipeline.settings.sections import (
    EMBEDDED_MODEL,
    CostSettings,
    DataSettings,
    EndpointSettings,
    EvaluationSettings,
    FlywheelSettings,
    GenerationSettings,
    GrpoSettings,
    LiveSettings,
    ModelSettings,
    PairSettings,
    PreflightSettings,
    ScoringSettings,
    ServeSettings,
    StorageSettings,
    TableSourceSettings,
    TaoSettings,
    TrainingSettings,
)

__all__ = [
    "CONFIG_ENV",
    "EMBEDDED_MODEL",
    "OVERRIDES_ENV",
    "CostSettings",
    "DataSettings",
    "EndpointSettings",
    "EvaluationSettings",
    "FlywheelSettings",
    "GenerationSettings",
    "GrpoSettings",
    "LiveSettings",
    "ModelSettings",
    "PairSettings",
    "PreflightSettings",
    "ScoringSettings",
    "ServeSettings",
    "SettingsError",
    "StorageSettings",
    "SettingsSource",
    "TableSourceSettings",
    "TaoSettings",
    "TrainingSettings",
    "default_config_file",
    "load_settings",
    "parse_override",
]
