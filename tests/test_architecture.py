"""The layout's promises that a linter cannot check: thin assets, one vocabulary for settings and scoring."""

import ast
import subprocess
import sys
from pathlib import Path

from tao_pipeline.scoring.catalog import SCORER_CLASSES
from tao_pipeline.scoring.extractors import EXTRACTORS, PARAMETERISED_EXTRACTORS
from tao_pipeline.settings.vocabulary import EXTRACTOR_NAMES, PARAMETERISED_EXTRACTOR_NAMES, SCORER_NAMES

ASSETS = Path(__file__).resolve().parents[1] / "tao_pipeline" / "defs" / "assets"
MAX_ASSET_LINES = 25


def asset_functions() -> dict[str, int]:
    """Every @dg.asset function under defs/assets/, with its length in lines (decorator included)."""
    lengths = {}
    for path in sorted(ASSETS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(_is_asset(d) for d in node.decorator_list):
                first = min(decorator.lineno for decorator in node.decorator_list)
                lengths[f"{path.name}:{node.name}"] = node.end_lineno - first + 1
    return lengths


def _is_asset(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "asset"


def test_every_asset_reads_calls_writes_and_reports_in_25_lines_or_fewer():
    lengths = asset_functions()
    assert len(lengths) == 10  # the eight stages of a round, ingestion and the lake's mirror
    assert all(lines <= MAX_ASSET_LINES for lines in lengths.values()), lengths


def test_every_scorer_name_settings_accept_is_implemented_and_no_other():
    assert set(SCORER_NAMES) == {"self_consistency", *SCORER_CLASSES}


def test_every_extractor_name_settings_accept_is_implemented_and_no_other():
    assert set(EXTRACTOR_NAMES) == set(EXTRACTORS)
    assert set(PARAMETERISED_EXTRACTOR_NAMES) == set(PARAMETERISED_EXTRACTORS)


HEAVY_LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "scipy", "matplotlib")


def test_loading_the_code_location_imports_no_model_or_plotting_library():
    """Every Dagster run process, the code server and every sensor tick's process load the code location: an
    ingest run must not pay for torch and TRL (about 5 CPU-seconds a process, 2026-12-04), only a stage that
    uses them."""
    probe = (
        "import sys, tao_pipeline.definitions as d; d.load_definitions(); "
        f"print(','.join(m for m in {HEAVY_LIBRARIES!r} if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert not loaded, f"loading the code location imported {loaded}: import them inside the function that uses them"
