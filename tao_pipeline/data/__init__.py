"""Data: the lake (Parquet + DuckDB catalog), usage-log ingestion, prompts and which round takes which."""
