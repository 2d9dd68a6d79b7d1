"""Sequence-to-sequence generation (translation, summarisation) with any ``AutoModelForSeq2SeqLM`` (T5, BART, Marian).

The model computes its own loss from ``labels`` (padding set to -100, decoder inputs shifted from the labels by the
model); validation and test generate text and score it against the raw target text with torchmetrics' SacreBLEU, chrF
and ROUGE.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torchmetrics import MetricCollection

from ptft.core.errors import PtftError
from ptft.core.hf import HFModule, build_hf_model
from ptft.core.module import FineTuneModule
from ptft.text.base import TextDataModule, column, sort_by_length

__all__ = ["Seq2SeqDataModule", "Seq2SeqGenerator"]

Seq2SeqMetric = Literal["sacrebleu", "chrf", "rouge"]
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
#: The logged value each configured metric's best checkpoint follows.
MONITORS = {"sacrebleu": "bleu", "chrf": "chrf", "rouge": "rougeL"}
#: Batch keys that carry raw text for metrics and predictions, not model inputs.
TEXT_KEYS = ("source_text", "target_text")


def check_seq2seq(model_name: str, model_config: dict[str, Any] | None) -> None:
    """One-line error when ``model_name`` is not an encoder-decoder model (a BERT folder given to this module)."""
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    from ptft.core.hub import load_pretrained, resolve_model_name

    model_type = (model_config or {}).get("model_type")
    if model_type is None:
        model_type = load_pretrained(AutoConfig.from_pretrained, resolve_model_name(model_name), "config").model_type
    if model_type not in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        encoder = model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES  # BERT-likes are causal-capable too
        if not encoder and model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            instead = "a decoder-only model belongs to ptft.text.LanguageModel or ptft.text.ChatFineTuner"
        else:
            instead = "an encoder belongs to ptft.text.TextClassifier (or another encoder task module)"
        raise PtftError(
            f"{model_name!r} is a {model_type!r} model, not an encoder-decoder (seq2seq) one: {instead}; "
            "Seq2SeqGenerator needs a model such as t5-small, facebook/bart-base or Helsinki-NLP/opus-mt-en-de"
        )


class Seq2SeqGenerator(HFModule, FineTuneModule):
    """Text-to-text generation (translation, summarisation) with any ``AutoModelForSeq2SeqLM`` model.

    Training minimises the model's own cross-entropy on the target tokens. Validation and test also generate (beam
    search or greedy) and score the output against the target text; ``ptft predict`` writes one generated text per
    source row.

    Args:
        model_name: Hugging Face hub name (``t5-small``, ``facebook/bart-base``, ``Helsinki-NLP/opus-mt-en-de``), a
            local folder written by ``save_pretrained``, or a ptft checkpoint (``.ckpt``). Also the default tokenizer
            of the data module.
        pretrained: Load the pretrained weights. ``False`` builds the architecture with random weights.
        model_config: Values overriding the model's config (``{dropout_rate: 0.2}``). A dict holding ``model_type``
            is a complete config, used without reading ``model_name``'s (full checkpoints store it this way).
        metrics: Generation metrics, from torchmetrics: ``sacrebleu`` (logged as ``bleu``, 0-1), ``chrf`` (0-1) and
            ``rouge`` (``rouge1``, ``rouge2``, ``rougeL`` F-measures). The best checkpoint follows the first one
            (``val/bleu``, ``val/chrf`` or ``val/rougeL``); with none, it follows ``val/loss``.
        num_beams: Beam width for generation; 1 is greedy decoding.
        max_new_tokens: Most tokens generated per example.
        length_penalty: Beam search's exponent on the length (above 1 favours longer outputs, below 1 shorter).
        generate_every_n_epochs: Generate and score during validation every this many epochs (from the first);
            0 never generates during fitting (the loss only, and the best checkpoint follows ``val/loss``). Test and
            predict always generate.
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.FineTuneModule` (``optimizer``,
            ``scheduler``, ``l1``, ``l2_sp``, ``peft``, ``checkpoint_weights``, ``compile``,
            ``gradient_checkpointing``).
    """

    needs_processor = True  # an export without its tokenizer is refused (ptft.core.hf.HFModule.save_model)

    #: The LM head is pretrained (usually tied to the embeddings): not a new head with its own learning rate.
    pretrained_heads = ("lm_head",)

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        model_config: dict[str, Any] | None = None,
        metrics: list[Seq2SeqMetric] = ["sacrebleu", "chrf", "rouge"],  # noqa: B006 (shown by --print_config)
        num_beams: int = 1,
        max_new_tokens: int = 64,
        length_penalty: float = 1.0,
        generate_every_n_epochs: int = 1,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(metrics) - set(MONITORS))
        if unknown:
            raise PtftError(f"unknown metrics {unknown}: choose from {sorted(MONITORS)}")
        if num_beams < 1 or max_new_tokens < 1 or generate_every_n_epochs < 0:
            raise PtftError("num_beams and max_new_tokens must be at least 1, generate_every_n_epochs at least 0")
        self.metric_names = list(dict.fromkeys(metrics))
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.length_penalty = length_penalty
        self.generate_every_n_epochs = generate_every_n_epochs
        super().__init__(**kwargs)
        from transformers import AutoModelForSeq2SeqLM

        self.model_name = model_name
        check_seq2seq(model_name, model_config)
        model = build_hf_model(AutoModelForSeq2SeqLM, model_name, pretrained, model_config)
        architecture = model.config.to_dict()
        self.set_model(model)
        # Read by the CLI from the instance: the best checkpoint follows the first configured metric.
        if self.metric_names and generate_every_n_epochs > 0:
            self.checkpoint_monitor = (f"val/{MONITORS[self.metric_names[0]]}", "max")
        else:
            self.checkpoint_monitor = ("val/loss", "min")
        self._tokenizer: Any = None
        self._save_hparams(pretrained=False, model_config=architecture)

    # --- metrics --------------------------------------------------------------------------------------------
    def build_metrics(self) -> MetricCollection | None:
        from torchmetrics.text import CHRFScore, ROUGEScore, SacreBLEUScore

        build = {
            "sacrebleu": lambda: SacreBLEUScore(),
            "chrf": lambda: CHRFScore(),
            "rouge": lambda: ROUGEScore(rouge_keys=ROUGE_KEYS),  # without rougeLsum / stemming: no nltk needed
        }
        if not self.metric_names:
            return None
        return MetricCollection({name: build[name]() for name in self.metric_names}, compute_groups=False)

    def generates(self, stage: str) -> bool:
        """Whether ``stage``'s steps generate text this epoch (validation: every ``generate_every_n_epochs``)."""
        if stage == "test":
            return True
        if stage != "val" or not self.generate_every_n_epochs:
            return False
        return self.current_epoch % self.generate_every_n_epochs == 0

    @property
    def tokenizer(self) -> Any:
        """The data module's tokenizer (decodes generated ids), or ``model_name``'s outside a trainer."""
        if self._tokenizer is None:
            trainer = self._trainer
            self._tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                from ptft.core.hub import load_pretrained, resolve_model_name

                self._tokenizer = load_pretrained(AutoTokenizer.from_pretrained, resolve_model_name(self.model_name), "tokenizer")
        return self._tokenizer

    # --- steps ----------------------------------------------------------------------------------------------
    @staticmethod
    def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k not in TEXT_KEYS}

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model(**self.model_inputs(batch))

    def generate(self, batch: dict[str, Any]) -> list[str]:
        """Generated text for each example of ``batch`` (special tokens removed)."""
        ids = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            num_beams=self.num_beams,
            max_new_tokens=self.max_new_tokens,
            length_penalty=self.length_penalty,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        loss = self(batch).loss
        return loss, (self.generate(batch) if self.metric_names and self.generates(stage) else None)

    def update_metrics(self, stage: str, outputs: Any, batch: dict[str, Any]) -> None:
        if outputs is None:
            return
        # References are the raw target text, not decoded labels: truncation and tokenisation do not flatter scores.
        references = batch.get("target_text")
        if references is None:
            references = self.tokenizer.batch_decode(batch["labels"].clamp(min=0), skip_special_tokens=True)
        metrics = self.metrics[f"{stage}_"]
        for name, metric in metrics.items(keep_base=True):
            # SacreBLEU / chrF take several references per example; ROUGE one string (or a list) each.
            metric.update(outputs, [[r] for r in references] if name != "rouge" else list(references))

    def epoch_metrics(self, stage: str) -> dict[str, torch.Tensor] | None:
        """The generation scores of every rank's examples (torchmetrics syncs the states); ``None`` when no step
        generated (``generate_every_n_epochs``)."""
        metrics = self.metrics[f"{stage}_"] if self.metric_names else None
        if metrics is None or not any(m.update_called for m in metrics.values()):
            return None
        values: dict[str, torch.Tensor] = {}
        for name, metric in metrics.items(keep_base=True):
            result = metric.compute()
            if name == "rouge":
                values.update({f"{stage}/{key}": result[f"{key}_fmeasure"] for key in ROUGE_KEYS})
            else:
                values[f"{stage}/{MONITORS[name]}"] = result
        return values

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """The source text and the generated text of each example."""
        predictions = self.generate(batch)
        sources = batch.get("source_text") or self.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        return {"sources": list(sources), "predictions": predictions}

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """``source`` (the input text, without the prefix) and ``prediction`` (the generated text)."""
        return [{"source": s, "prediction": p} for s, p in zip(outputs["sources"], outputs["predictions"])]


class Seq2SeqDataModule(TextDataModule):
    """Source / target text pairs (translation, summarisation) from files or a Hugging Face dataset.

    Give either files (``train_file`` …) or a ``dataset`` name with split names. Without a validation file or
    split, ``val_fraction`` of the training data is held out (seeded). Rows whose target is empty are an error.

    Args:
        source_column: Column with the input text (the sentence to translate, the document to summarise).
        target_column: Column with the output text (the translation, the summary). Not needed to predict.
        source_prefix: Text put before every source, as T5 expects (``"translate English to German: "``,
            ``"summarize: "``); empty for BART and Marian.
        max_source_length: Truncate sources to this many tokens; defaults to ``max_length``.
        max_target_length: Truncate training targets to this many tokens (metrics use the full target text).
        group_by_length: Batch sources of similar length together (less padding, faster). Off by default: it cost
            BLEU in the recipe parity benchmark (docs/benchmarks.md).
        **kwargs: The shared text data arguments of :class:`ptft.text.base.TextDataModule` (``train_file``,
            ``val_file``, ``test_file``, ``predict_file``, ``dataset``, ``dataset_config``, splits,
            ``rename_columns``, ``tokenizer``, ``max_length``, ``batch_size``, ``eval_batch_size``,
            ``val_fraction``, ``seed``, ``num_workers``).
    """

    def __init__(
        self,
        source_column: str = "source",
        target_column: str = "target",
        source_prefix: str = "",
        max_source_length: int | None = None,
        max_target_length: int = 128,
        group_by_length: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(logger=False)
        self.source_column = source_column
        self.target_column = target_column
        self.source_prefix = source_prefix
        self.max_source_length = max_source_length or self.max_length
        self.max_target_length = max_target_length
        self.group_by_length = group_by_length
        self._collator: Any = None
        self._checked = False

    def columns(self, split: str) -> dict[str, str]:
        # A nested column (``translation.en``) needs its top-level column; raw() flattens it.
        needed = {self.source_column.split(".")[0]: "source_column"}
        if split != "predict":
            needed[self.target_column.split(".")[0]] = "target_column"
        return needed

    def raw(self) -> dict[str, Any]:
        raw = super().raw()
        if not self._checked:  # on the files as given, so row numbers match them (before any held-out split)
            for split, ds in raw.items():
                if ds is None:
                    continue
                needed = {self.source_column: "source_column"}
                if split != "predict":
                    needed[self.target_column] = "target_column"
                if any(name not in ds.column_names for name in needed):
                    ds = raw[split] = ds.flatten()  # {"translation": {"en": …, "de": …}} -> translation.en, translation.de
                for name, arg in needed.items():
                    if name not in ds.column_names:
                        raise PtftError(
                            f"{self.sources.describe(split)} has no column {name!r} (columns: {ds.column_names}); "
                            f"set data.init_args.{arg}"
                        )
                if split != "predict":
                    self.check_targets(ds, split)
            self._checked = True
        return raw

    def check_targets(self, ds: Any, split: str) -> None:
        """One-line error naming how many rows have an empty target, and the first."""
        empty = [i for i, t in enumerate(column(ds, self.target_column)) if t is None or not str(t).strip()]
        if empty:
            raise PtftError(
                f"{self.sources.describe(split)}: {len(empty)} of {len(ds)} rows have an empty "
                f"{self.target_column!r} (first: row {empty[0]}, counting from 0 after any header); "
                "remove them or set data.init_args.target_column"
            )

    def encode(self, ds: Any, split: str) -> Any:
        tokenizer, prefix = self.tokenizer, self.source_prefix
        source, target = self.source_column, self.target_column
        max_source, max_target = self.max_source_length, self.max_target_length

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            texts = ["" if s is None else str(s) for s in batch[source]]
            enc = tokenizer([prefix + s for s in texts], truncation=True, max_length=max_source)
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            if split != "train":
                enc["source_text"] = texts
            if split != "predict":
                targets = [str(t) for t in batch[target]]
                enc["labels"] = tokenizer(text_target=targets, truncation=True, max_length=max_target)["input_ids"]
                if split != "train":
                    enc["target_text"] = targets
            return enc

        encoded = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {split}")
        return sort_by_length(encoded) if split in ("val", "test") else encoded

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if self._collator is None:
            from transformers import DataCollatorForSeq2Seq

            # Without the model: T5, BART and Marian shift the labels into decoder inputs themselves.
            self._collator = DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=-100, return_tensors="pt")
        texts = {k: [f[k] for f in features] for k in TEXT_KEYS if k in features[0]}
        batch = self._collator([{k: v for k, v in f.items() if k not in TEXT_KEYS and k != "length"} for f in features])
        return {**batch, **texts}

    def train_lengths(self) -> list[int] | None:
        return column(self.datasets["train"], "length") if self.group_by_length else None
