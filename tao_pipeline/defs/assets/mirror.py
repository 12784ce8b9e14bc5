"""After each round: the lake's changed Parquet files uploaded to object storage (storage.lake_mirror_url)."""

import dagster as dg

from tao_pipeline.common.object_store import mirror_tree
from tao_pipeline.defs.constants import STORAGE_GROUP
from tao_pipeline.defs.resources import TaoSettingsResource


@dg.asset(group_name=STORAGE_GROUP, kinds={"s3", "parquet"})
def lake_mirror(settings: TaoSettingsResource) -> dg.MaterializeResult:
    """Upload every lake partition whose content the mirror does not hold yet (by SHA-256), the mirror's
    manifest last; the sensors run it after every round, promoted or not."""
    config = settings.get()
    url = config.storage.lake_mirror_url
    if url is None:
        return dg.MaterializeResult(metadata={"mirror": "off (storage.lake_mirror_url is not set)"})
    summary = mirror_tree(config.lake_dir, url)
    return dg.MaterializeResult(
        metadata={
            "mirror": dg.MetadataValue.url(url),
            "uploaded_files": summary.uploaded,
            "unchanged_files": summary.unchanged,
            "uploaded_mb": round(summary.bytes_uploaded / 2**20, 2),
        }
    )
