"""Dagster resources: the settings, the lake and the model store, all rooted in one home folder."""

from __future__ import annotations

import dagster as dg

from tao_pipeline.lake import Lake
from tao_pipeline.model_store import ModelStore
from tao_pipeline.settings import TaoSettings, load_settings


class TaoSettingsResource(dg.ConfigurableResource):
    """The pipeline's settings: a TOML file (default ./tao.toml or $TAO_CONFIG) plus dotted overrides."""

    config_file: str | None = None
    overrides: list[str] = []

    def get(self) -> TaoSettings:
        return load_settings(self.config_file, self.overrides)


class LakeResource(dg.ConfigurableResource):
    """Parquet tables per round with a DuckDB catalog, under <home>/lake."""

    settings: TaoSettingsResource

    def get(self) -> Lake:
        return Lake(self.settings.get().lake_dir)


class ModelStoreResource(dg.ConfigurableResource):
    """Base models, checkpoints and the version registry, under <home>/models."""

    settings: TaoSettingsResource

    def get(self) -> ModelStore:
        return ModelStore(self.settings.get().models_dir)


def build_resources(config_file: str | None = None, overrides: list[str] | None = None) -> dict:
    settings = TaoSettingsResource(config_file=config_file, overrides=list(overrides or []))
    return {
        "settings": settings,
        "lake": LakeResource(settings=settings),
        "model_store": ModelStoreResource(settings=settings),
    }
