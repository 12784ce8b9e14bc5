"""The TAO round as software-defined assets, one module per stage, plus ingestion."""

from tao_pipeline.assets.evaluation import champion, checkpoint_evaluation
from tao_pipeline.assets.generation import candidate_responses
from tao_pipeline.assets.ingest import usage_logs
from tao_pipeline.assets.pairs import preference_pairs
from tao_pipeline.assets.prompts import raw_prompts
from tao_pipeline.assets.scoring import response_scores
from tao_pipeline.assets.training import control_checkpoint, tuned_checkpoint

ROUND_ASSETS = [
    raw_prompts, candidate_responses, response_scores, preference_pairs,
    tuned_checkpoint, control_checkpoint, checkpoint_evaluation, champion,
]
INGEST_ASSETS = [usage_logs]
