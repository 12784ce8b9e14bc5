"""The round's stages as software-defined assets, one module per stage, plus ingestion of usage logs."""
