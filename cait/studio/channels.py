"""The Channels tab's answer: the q/k, v and FFN channels each block of the twin keeps (paper Fig. 6)."""
from __future__ import annotations

import plotly.graph_objects as go

from ..models.spec import describe
from ..viz.charts import channels_figure
from .pairs import ModelPair


def channels_view(pair: ModelPair, label: str) -> go.Figure:
    """Retained q/k, v and FFN channels per block, as a share of the original; ``label`` names the model."""
    return channels_figure(describe(pair.original), describe(pair.compressed),
                           title=f"{label}: retained channels per block (ATME {pair.merge or 'none'})")
