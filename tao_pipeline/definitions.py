"""The code location: everything under ``defs/``, loaded the way Dagster's own projects load theirs.

``dagster dev -m tao_pipeline.definitions`` (what `tao ui` runs), ``workspace.yaml`` and
``[tool.dagster]`` in pyproject.toml all point here. The folder's project file is
``tao_pipeline/dg.toml``, shipped inside the package so an installed wheel loads the same way.
"""

from pathlib import Path

import dagster as dg


def load_definitions() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)


@dg.definitions
def defs() -> dg.Definitions:
    return load_definitions()
