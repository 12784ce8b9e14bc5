"""The Dagster layer: every definition of the code location, and nothing else.

``tao_pipeline.definitions`` loads this folder with ``dg.load_from_defs_folder``:
``resources/`` (settings, lake, model store; registered in one place), ``assets/`` (one module
per stage), ``checks``, ``jobs``, ``sensors`` and ``schedules``. Each asset reads its inputs from
the lake, calls one domain function, writes the result and returns metadata; the work itself
lives in the domain packages, which never import dagster.
"""
