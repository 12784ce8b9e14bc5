"""Dagster resources: the settings, the lake and the model store, all rooted in one home folder.

Registered here, in one place. The settings resource is the only way settings reach Dagster
code: assets, checks, sensors and the schedule take it as a parameter, and it loads the settings
once per run or tick from its source (a config file and dotted overrides). The code location
builds it from the source its process was started with (`tao ui --config/--set` hand that down
through the environment); a launchpad run, or `tao round`, may replace the source in run config
under ``resources.settings.config``.
"""

import dagster as dg
from pydantic import PrivateAttr

from tao_pipeline.data.lake import Lake
from tao_pipeline.registry.store import ModelStore
from tao_pipeline.scoring import check_scorers
from tao_pipeline.settings import SettingsSource, TaoSettings


class TaoSettingsResource(dg.ConfigurableResource):
    """The pipeline's settings: a TOML file (default ./tao.toml or $TAO_CONFIG) plus dotted overrides."""

    config_file: str | None = None
    overrides: list[str] = []
    _settings: TaoSettings | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._settings = self.source.load()  # once per run or sensor tick; a bad setting fails here, named
        if context.dagster_run is not None:  # a run (not a tick): its scorer options too, before any step
            check_scorers(self._settings.scoring, self._settings.cache_dir)

    @property
    def source(self) -> SettingsSource:
        return SettingsSource(self.config_file, tuple(self.overrides))

    def get(self) -> TaoSettings:
        return self._settings if self._settings is not None else self.source.load()


class LakeResource(dg.ConfigurableResource):
    """Parquet tables per round with a DuckDB catalog, under <home>/lake."""

    settings: dg.ResourceDependency[TaoSettingsResource]

    def get(self) -> Lake:
        return Lake(self.settings.get().lake_dir)


class ModelStoreResource(dg.ConfigurableResource):
    """Base models, checkpoints and the version registry, under <home>/models."""

    settings: dg.ResourceDependency[TaoSettingsResource]

    def get(self) -> ModelStore:
        return ModelStore(self.settings.get().models_dir)


def build_resources(config_file: str | None = None, overrides: list[str] | None = None) -> dict:
    """The resources for a settings source, keyed as the assets name them.

    The settings resource is configured at launch: ``config_file`` and ``overrides`` are defaults
    that a run's config (``resources.settings.config``) may replace, and the lake and the model
    store then follow the run's settings, not these defaults.
    """
    settings = TaoSettingsResource.configure_at_launch(config_file=config_file, overrides=list(overrides or []))
    return {
        "settings": settings,
        "lake": LakeResource(settings=settings),
        "model_store": ModelStoreResource(settings=settings),
    }


def startup_settings() -> TaoSettings:
    """The settings this process was started with: what Dagster needs to build definitions (the sensor
    interval, the schedule's cron). Loaded when the code location loads, never at import; the scorers'
    options are checked then too, so a bad one keeps the code location from loading, named."""
    settings = SettingsSource.from_environment().load()
    check_scorers(settings.scoring, settings.cache_dir)
    return settings


@dg.definitions
def resources() -> dg.Definitions:
    source = SettingsSource.from_environment()
    return dg.Definitions(resources=build_resources(source.config_file, list(source.overrides)))
