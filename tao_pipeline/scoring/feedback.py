"""Users' feedback as a scorer: what the people who read the answers thought of them.

A candidate whose text users rated scores its mean rating mapped onto [0, 1] (thumbs up 1,
thumbs down 0); a user's corrected answer scores 1; a candidate nobody rated scores ``unrated``
(0.5: neither preferred nor avoided), so in a weighted composite the feedback part moves rated
answers up or down and leaves the others to the remaining scorers.

The ratings travel with the round's training candidates only (``PromptContext.feedback``): held-out
evaluation never sees them, so feedback shapes pairs but is never scored as if it were a label.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from tao_pipeline.scoring.base import PromptContext, Score, scorer_options


class FeedbackScorer:
    name = "feedback"

    @scorer_options
    def __init__(self, *, unrated: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5):
        self.unrated = unrated

    def score_group(self, context: PromptContext, responses: list[str]) -> list[Score]:
        ratings = context.feedback
        return [(ratings[text] + 1.0) / 2.0 if text in ratings else self.unrated for text in responses]
