"""Continued pre-training on raw text: masked (BERT-style) or causal (GPT-style) language modelling.

The checkpoint it writes is a starting point for the other text tasks: ``model_name: runs/mlm/.../last.ckpt`` in a
classification, NER or QA recipe loads the language-model-trained encoder (and its tokenizer).
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import MetricCollection

from ptft.core.errors import PtftError
from ptft.core.hf import HFModule, build_hf_model
from ptft.core.module import FineTuneModule
from ptft.core.token_loss import Perplexity, TokenMeanLoss
from ptft.text.base import TextDataModule, column

Objective = Literal["mlm", "clm"]


def _model_type(model_name: str, model_config: dict[str, Any] | None) -> str:
    """The ``model_type`` of ``model_name`` (or of a complete ``model_config``), read from its config only."""
    if model_config and "model_type" in model_config:
        return model_config["model_type"]
    from transformers import AutoConfig

    from ptft.core.hub import load_pretrained, resolve_model_name

    return load_pretrained(AutoConfig.from_pretrained, resolve_model_name(model_name), "config").model_type


class LanguageModel(TokenMeanLoss, HFModule, FineTuneModule):
    """Masked (``mlm``) or causal (``clm``) language modelling with the model's own pretrained LM head.

    ``mlm`` builds ``AutoModelForMaskedLM`` (BERT, RoBERTa, DeBERTa, MiniLM…), ``clm`` builds
    ``AutoModelForCausalLM`` (GPT-2, Llama, SmolLM…). Logs ``val/loss`` (the mean negative log-likelihood per
    predicted token of the validation set) and ``val/perplexity`` (its exp); the best checkpoint follows ``val/loss``.
    Under gradient accumulation and DDP every token of an optimizer step weighs the same
    (:class:`ptft.core.token_loss.TokenMeanLoss`). Checkpoints that lack the LM head (sentence-transformers exports
    of BERT models) get it initialised by transformers, which says so in a warning.

    Args:
        model_name: Hugging Face hub name (``sentence-transformers/all-MiniLM-L6-v2``, ``gpt2``), a local folder with
            ``config.json`` and weights, or a ptft checkpoint (``.ckpt``). Also the default tokenizer of the data.
        objective: ``mlm`` (predict masked tokens) or ``clm`` (predict the next token). The data module masks or
            shifts accordingly.
        pretrained: Load the pretrained weights. ``False`` builds the architecture with random weights.
        model_config: Values overriding the model's config (``{hidden_dropout_prob: 0.1}``). A dict holding
            ``model_type`` is a complete config and is used without reading ``model_name``'s.
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.FineTuneModule` (``optimizer``,
            ``scheduler``, ``l1``, ``l2_sp``, ``peft``, ``checkpoint_weights``, ``compile``,
            ``gradient_checkpointing``).
    """

    needs_processor = True  # an export without its tokenizer is refused (ptft.core.hf.HFModule.save_model)

    checkpoint_monitor = ("val/loss", "min")

    def __init__(
        self,
        model_name: str,
        objective: Objective = "mlm",
        pretrained: bool = True,
        model_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )

        if objective not in ("mlm", "clm"):
            raise PtftError(f"objective must be 'mlm' or 'clm', not {objective!r}")
        supported = MODEL_FOR_MASKED_LM_MAPPING_NAMES if objective == "mlm" else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        model_type = _model_type(model_name, model_config)
        if model_type not in supported:
            other = "clm" if objective == "mlm" else "mlm"
            kind = "masked" if objective == "mlm" else "causal"
            raise PtftError(
                f"{model_name!r} ({model_type}) has no {kind} language-modelling head, so objective {objective!r} "
                f"does not apply; use objective: {other} or a model that supports {objective}"
            )
        self.model_name = model_name
        self.objective = objective
        auto_class = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
        model = build_hf_model(auto_class, model_name, pretrained, model_config)
        architecture = model.config.to_dict()
        self.set_model(model)
        self._save_hparams(pretrained=False, model_config=architecture)

    def head_modules(self, model: nn.Module) -> list[str]:
        """None: the LM head (BERT's ``cls``, GPT's ``lm_head``) is part of the pretrained model, not a new head."""
        return []

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"perplexity": Perplexity()})

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**batch)

    def loss_tokens(self, batch: dict[str, Any]) -> int:
        """The predicted tokens: masked ones (``mlm``), every labelled token but the first of a row (``clm``)."""
        labels = batch["labels"] if self.objective == "mlm" else batch["labels"][:, 1:]  # token t predicts t + 1
        return int((labels != -100).sum())

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        loss = self(batch).loss
        return loss, loss.detach()

    def update_metrics(self, stage: str, outputs: Any, batch: dict[str, Any]) -> None:
        if stage != "train":  # perplexity is an evaluation metric
            self.metrics[f"{stage}_"]["perplexity"].update(outputs, weight=self.loss_tokens(batch))

    def epoch_metrics(self, stage: str) -> dict[str, torch.Tensor] | None:
        metric = self.metrics[f"{stage}_"]["perplexity"]
        return {f"{stage}/perplexity": metric.compute()} if metric.update_count else None


def load_text_file(path: Path) -> Any:
    """A ``.txt`` file as a ``datasets.Dataset`` with one row per line, in column ``text``."""
    import datasets

    try:
        return datasets.load_dataset("text", data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types (an empty file among them)
        raise PtftError(f"{path} has no text ({str(err).splitlines()[0]})") from err


class LanguageModelingDataModule(TextDataModule):
    """Raw text for language modelling: ``.txt`` files (one line per row) or a text column of csv / jsonl / parquet.

    Texts are tokenised, concatenated and cut into blocks of ``block_size`` tokens (as Hugging Face's ``run_mlm`` /
    ``run_clm``), or kept one per example with ``line_by_line``. Empty lines are dropped. Masking (``mlm``) or
    next-token labels (``clm``) follow the model's ``objective``, through transformers'
    ``DataCollatorForLanguageModeling``. Validation and test masks are drawn once, seeded, so ``val/loss`` compares
    between epochs and runs.

    Args:
        text_column: Column with the text (csv / json / parquet; a ``.txt`` file's lines are the text).
        block_size: Tokens per example: the block length when grouping, the truncation length with
            ``line_by_line``. At most the model's maximum positions.
        line_by_line: One example per line (truncated to ``block_size``) instead of concatenated blocks.
        mlm_probability: Fraction of tokens masked for ``mlm`` (80% become the mask token, 10% a random token, 10%
            stay).
        whole_word_mask: Mask all the sub-word tokens of a word together (``mlm`` only; needs a fast tokenizer).
        **kwargs: The shared text data arguments of :class:`ptft.text.base.TextDataModule` (``train_file``,
            ``val_file``, ``test_file``, ``dataset``, ``dataset_config``, splits, ``rename_columns``, ``tokenizer``,
            ``batch_size``, ``eval_batch_size``, ``val_fraction``, ``seed``, ``num_workers``); ``max_length`` is
            replaced by ``block_size``. Files may also be ``.txt``.
    """

    def __init__(
        self,
        text_column: str = "text",
        block_size: int = 128,
        line_by_line: bool = False,
        mlm_probability: float = 0.15,
        whole_word_mask: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(logger=False)
        if block_size < 2:
            raise PtftError(f"block_size must be at least 2, not {block_size}")
        if not 0 < mlm_probability < 1:
            raise PtftError(f"mlm_probability must be between 0 and 1, not {mlm_probability}")
        self.text_column = text_column
        self.block_size = self.max_length = block_size
        self.line_by_line = line_by_line
        self.mlm_probability = mlm_probability
        self.whole_word_mask = whole_word_mask
        self.objective: str | None = None
        self.max_positions: int | None = None
        self._collators: dict[str, Any] = {}

    # --- model connection -----------------------------------------------------------------------------------
    def connect(self, model: Any) -> None:
        super().connect(model)
        self.objective = getattr(model, "objective", self.objective)
        config = getattr(getattr(model, "model", None), "config", None)
        self.max_positions = getattr(config, "max_position_embeddings", None) if config is not None else None

    # --- raw data -------------------------------------------------------------------------------------------
    def columns(self, split: str) -> dict[str, str]:
        return {self.text_column: "text_column"}

    def read_file(self, path: Path) -> Any:
        """``.txt`` files are one text per line; other formats load as the base's."""
        if path.suffix.lower() != ".txt":
            return super().read_file(path)
        ds = load_text_file(path)
        return ds if self.text_column == "text" else ds.rename_column("text", self.text_column)

    def raw(self) -> dict[str, Any]:
        if self._raw is None:
            self._raw = {split: self._drop_empty(ds, split) for split, ds in super().raw().items()}
        return self._raw

    def _drop_empty(self, ds: Any, split: str) -> Any:
        if ds is None:
            return None
        name = self.text_column
        ds = ds.filter(lambda rows: [isinstance(t, str) and not t.isspace() and t != "" for t in rows[name]],
                       batched=True, desc=f"Dropping empty lines ({split})")
        if len(ds) == 0:
            raise PtftError(f"{self.sources.describe(split)} has no text: every row of column {name!r} is empty")
        return ds

    # --- setup ----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.objective is None:
            self._connect_from_trainer()
        tokenizer = self.load_tokenizer()
        limits = [n for n in (self.max_positions, tokenizer.model_max_length) if n is not None and n < 1_000_000]
        if limits and self.block_size > min(limits):
            raise PtftError(
                f"block_size={self.block_size} exceeds the model's {min(limits)} positions; "
                f"set data.init_args.block_size to at most {min(limits)}"
            )
        if self.objective == "mlm" and tokenizer.mask_token is None:
            raise PtftError(f"tokenizer {self.tokenizer_name!r} has no mask token: objective mlm needs one; use clm")
        if self.whole_word_mask and self.objective != "mlm":
            raise PtftError("whole_word_mask applies to objective mlm only")
        if self.whole_word_mask and not tokenizer.is_fast:
            raise PtftError("whole_word_mask needs a fast tokenizer (word boundaries come from its offsets)")
        if self.objective == "clm":
            if tokenizer.pad_token is None:  # GPT-2, Llama: padding reuses EOS; labels come from the attention mask
                if tokenizer.eos_token is None:
                    raise PtftError(f"tokenizer {self.tokenizer_name!r} has neither a pad nor an EOS token")
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "right"  # positions count from the first token
        super().setup(stage)

    def encode(self, ds: Any, split: str) -> Any:
        tokenizer, name, block, mlm = self.tokenizer, self.text_column, self.block_size, self.objective == "mlm"
        # CLM blocks span documents: an EOS between them says where one ends (GPT-2's tokenizer adds none itself).
        eos = tokenizer.eos_token_id if not mlm and not self.line_by_line else None

        def tokenize(rows: dict[str, list]) -> dict[str, list]:
            enc = tokenizer(
                rows[name],
                truncation=self.line_by_line, max_length=block if self.line_by_line else None,
                return_special_tokens_mask=mlm, return_offsets_mapping=self.whole_word_mask,
                return_token_type_ids=False,
            )
            if eos is not None:
                for i, ids in enumerate(enc["input_ids"]):
                    if not ids or ids[-1] != eos:
                        ids.append(eos)
                        enc["attention_mask"][i].append(1)
            return dict(enc)

        def group(rows: dict[str, list]) -> dict[str, list]:
            joined = {k: list(chain.from_iterable(v)) for k, v in rows.items()}
            total = len(joined["input_ids"]) // block * block  # the remainder is dropped, as in run_mlm / run_clm
            return {k: [v[i : i + block] for i in range(0, total, block)] for k, v in joined.items()}

        with _quiet_length_warning():
            ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {split}")
        if not self.line_by_line:
            tokens = sum(len(ids) for ids in column(ds, "input_ids"))
            ds = ds.map(group, batched=True, desc=f"Grouping {split} into blocks of {block}")
            if len(ds) == 0:
                raise PtftError(
                    f"{self.sources.describe(split)} holds {tokens} tokens, fewer than one block of {block}; "
                    "lower data.init_args.block_size or set line_by_line: true"
                )
        if mlm and split in ("val", "test"):
            ds = self._mask_once(ds)
        return ds

    def _mask_once(self, ds: Any) -> Any:
        """Masks an evaluation split once (seeded): the same masked positions every epoch and every run."""
        from transformers import DataCollatorForLanguageModeling

        # Seeded through torch's global generator, not the collator's `seed`: the collator refuses a seed in any
        # process but the main one (DDP workers started by ddp_spawn / ddp_fork), which must mask the same way.
        collator = self._lm_collator(DataCollatorForLanguageModeling)

        def mask(row: dict[str, Any]) -> dict[str, Any]:
            batch = collator([row])
            return {"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()}

        keep = ("input_ids", "attention_mask", "labels")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            ds = ds.map(mask, desc="Masking evaluation tokens", load_from_cache_file=False)  # the seed is not in its hash
        return ds.remove_columns([c for c in ds.column_names if c not in keep])

    # --- batches --------------------------------------------------------------------------------------------
    def _lm_collator(self, cls: Any) -> Any:
        try:
            return cls(self.tokenizer, mlm=self.objective == "mlm", mlm_probability=self.mlm_probability,
                       whole_word_mask=self.whole_word_mask, return_tensors="pt")
        except ValueError as err:
            raise PtftError(str(err).splitlines()[0]) from err

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        from transformers import (
            DataCollatorForLanguageModeling,
            DataCollatorForTokenClassification,
        )

        if "labels" in features[0]:  # evaluation rows masked once in encode: pad, labels with -100
            if "eval" not in self._collators:
                self._collators["eval"] = DataCollatorForTokenClassification(self.tokenizer, return_tensors="pt")
            return self._collators["eval"](features)
        if "train" not in self._collators:
            self._collators["train"] = self._lm_collator(DataCollatorForLanguageModeling)
        if self.whole_word_mask:
            # The collator takes word boundaries from the offsets but tokenizer.pad leaves them unpadded.
            longest = max(len(f["input_ids"]) for f in features)
            features = [{**f, "offset_mapping": f["offset_mapping"] + [[0, 0]] * (longest - len(f["input_ids"]))}
                        for f in features]
        batch = self._collators["train"](features)
        if self.objective == "clm":
            # The collator ignores every pad-token label, and pad is EOS for GPT-2 / Llama: real EOS tokens would
            # never be learned. Only padding positions (attention mask 0) are ignored.
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch


class _quiet_length_warning:
    """Silences the tokenizer's "sequence longer than the maximum" warning while whole documents are tokenised to
    be cut into blocks (as run_clm does): no document reaches the model longer than ``block_size``."""

    def __enter__(self) -> None:
        from transformers.utils import logging

        self.logger = logging.get_logger("transformers.tokenization_utils_base")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)
