"""The pre-training objectives a dual encoder can add to its contrastive loss (ALBEF / BLIP's recipe):

* ``itm`` -- image-text matching: a cross-attention head decides whether an image and a caption belong together,
  on the true pairs and on hard negatives drawn from the batch by their contrastive similarity;
* ``mlm`` -- masked language modelling on the text tower (BERT's 15%, 80/10/10 masking, drawn in the data workers
  by transformers' ``DataCollatorForLanguageModeling``), through a prediction head tied to the tower's word
  embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OBJECTIVES = ("contrastive", "itm", "mlm")


class MaskedLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then a decoder tied to the word embeddings (plus a bias)."""

    def __init__(self, hidden_size: int, embeddings: nn.Embedding, eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.embeddings = embeddings  # shared with the text tower, not a copy
        self.bias = nn.Parameter(torch.zeros(embeddings.num_embeddings))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(states))) @ self.embeddings.weight.T + self.bias


def hard_negatives(similarity: torch.Tensor, groups: torch.Tensor | None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives (ALBEF): for each image (row of ``similarity`` ``(B, B)``, image i against caption j) one
    caption drawn with probability ``softmax(similarity)`` among the captions of other groups, and likewise one image
    per caption. Returns ``(image_rows, caption_picks), (caption_rows, image_picks)``: only rows that have a negative
    at all (a row whose every pair shares its group has none)."""
    size = similarity.shape[0]
    ids = groups if groups is not None else torch.arange(size, device=similarity.device)
    same = ids[:, None] == ids[None, :]
    picks = []
    for sim in (similarity, similarity.T):
        weights = sim.float().softmax(-1).masked_fill(same, 0)
        rows = torch.nonzero(weights.sum(-1) > 0).flatten()
        drawn = torch.multinomial(weights[rows], 1, generator=generator).flatten() if len(rows) else rows
        picks.append((rows, drawn))
    return picks[0], picks[1]
