"""Task heads over a transformer encoder's token states: pooling (mean, attention), recurrent (LSTM, GRU).

``head: model`` keeps the Hugging Face model's own head (``AutoModelFor…``). The heads here sit on a bare
``AutoModel`` instead, wrapped by :class:`EncoderWithHead`, and are selected with ``head:`` in a recipe.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

SequenceHeadKind = Literal["model", "mean", "attention", "lstm", "gru"]
TokenHeadKind = Literal["model", "lstm", "gru"]


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``states`` (batch, time, hidden) over the positions where ``mask`` is 1."""
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class Recurrent(nn.Module):
    """A bidirectional LSTM or GRU over the unpadded part of each sequence (padding never enters the state)."""

    def __init__(self, kind: Literal["lstm", "gru"], input_size: int, hidden_size: int) -> None:
        super().__init__()
        rnn = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = rnn(input_size, hidden_size, batch_first=True, bidirectional=True)
        self.output_size = 2 * hidden_size

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(states, lengths, batch_first=True, enforce_sorted=False)
        output, _ = self.rnn(packed)
        output, _ = pad_packed_sequence(output, batch_first=True, total_length=states.shape[1])
        return output


class SequenceHead(nn.Module):
    """One label per sequence from the token states.

    Args:
        kind: ``mean`` (masked mean pooling, as sentence-transformers), ``attention`` (learned attention pooling),
            ``lstm`` / ``gru`` (a bidirectional RNN, then mean pooling of its outputs).
        hidden_size: The encoder's hidden size.
        num_labels: Number of classes.
        dropout: Dropout before the classifier.
        rnn_size: Hidden size per direction of the RNN (``lstm`` / ``gru``); defaults to half the encoder's.
    """

    def __init__(self, kind: str, hidden_size: int, num_labels: int, dropout: float = 0.1, rnn_size: int | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.settings = {"kind": kind, "hidden_size": hidden_size, "num_labels": num_labels, "dropout": dropout,
                         "rnn_size": rnn_size}  # what ptft_head.json stores to rebuild the head
        size = hidden_size
        if kind in ("lstm", "gru"):
            self.rnn = Recurrent(kind, hidden_size, rnn_size or max(hidden_size // 2, 1))
            size = self.rnn.output_size
        elif kind == "attention":
            self.score = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1))
        elif kind != "mean":
            raise ValueError(f"unknown sequence head {kind!r}")
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(size, num_labels)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind in ("lstm", "gru"):
            pooled = masked_mean(self.rnn(states, mask), mask)
        elif self.kind == "attention":
            scores = self.score(states).squeeze(-1).float()  # fp32 under autocast: the fill value must fit
            scores = scores.masked_fill(mask == 0, torch.finfo(scores.dtype).min)
            pooled = (scores.softmax(dim=-1).to(states.dtype).unsqueeze(-1) * states).sum(1)
        else:
            pooled = masked_mean(states, mask)
        return self.classifier(self.dropout(pooled))


class TokenHead(nn.Module):
    """One label per token: a bidirectional LSTM / GRU over the token states, then a linear classifier.

    Args:
        kind: ``lstm`` or ``gru``.
        hidden_size: The encoder's hidden size.
        num_labels: Number of tags.
        dropout: Dropout before the classifier.
        rnn_size: Hidden size per direction; defaults to half the encoder's.
    """

    def __init__(self, kind: str, hidden_size: int, num_labels: int, dropout: float = 0.1, rnn_size: int | None = None) -> None:
        super().__init__()
        if kind not in ("lstm", "gru"):
            raise ValueError(f"unknown token head {kind!r}")
        self.kind = kind
        self.settings = {"kind": kind, "hidden_size": hidden_size, "num_labels": num_labels, "dropout": dropout,
                         "rnn_size": rnn_size}
        self.rnn = Recurrent(kind, hidden_size, rnn_size or max(hidden_size // 2, 1))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.rnn.output_size, num_labels)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.rnn(states, mask)))


class EncoderWithHead(nn.Module):
    """A bare Hugging Face encoder (``AutoModel``) with a ptft head on its last hidden states.

    ``forward`` takes the tokenizer's tensors and returns the head's logits. ``save_pretrained`` writes the encoder
    as Hugging Face does and the head beside it (``ptft_head.safetensors``, and ``ptft_head.json`` with the head's
    settings); :meth:`from_pretrained` loads such a folder back::

        model = EncoderWithHead.from_pretrained("exported/")  # logits = model(**tokenizer(texts, return_tensors="pt"))

    transformers alone cannot: its ``AutoModelFor…`` classes have no mean / attention / RNN head.
    """

    HEADS = {"SequenceHead": SequenceHead, "TokenHead": TokenHead}

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    @property
    def config(self):  # the encoder's, so code reading model.config keeps working
        return self.encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        return self.head(states, attention_mask)

    def save_pretrained(self, folder: str, **kwargs) -> None:
        from safetensors.torch import save_file

        self.encoder.save_pretrained(folder, **kwargs)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(Path(folder) / "ptft_head.safetensors"))
        description = {"head": type(self.head).__name__, **self.head.settings}
        (Path(folder) / "ptft_head.json").write_text(json.dumps(description, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> EncoderWithHead:
        """The model :meth:`save_pretrained` wrote to ``folder``, in eval mode (``kwargs`` go to ``AutoModel``)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        settings = json.loads((Path(folder) / "ptft_head.json").read_text())
        head = cls.HEADS[settings.pop("head")](**settings)
        head.load_state_dict(load_file(str(Path(folder) / "ptft_head.safetensors")))
        return cls(AutoModel.from_pretrained(folder, **kwargs), head).eval()
