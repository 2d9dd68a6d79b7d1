"""Supervised fine-tuning (SFT) of causal language models on conversations: loss on the assistant's tokens only.

:class:`ChatFineTuner` trains any ``AutoModelForCausalLM`` on what :class:`ptft.text.sft_data.ChatDataModule`
renders, reports validation loss and perplexity, prints (or logs to W&B) a greedy reply at each validation, and writes
one reply per prompt on predict.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MetricCollection

from ptft.core.hf import HFModule, build_hf_model
from ptft.core.module import FineTuneModule
from ptft.core.token_loss import Perplexity, TokenMeanLoss
from ptft.text.chat import FALLBACK_CHAT_TEMPLATE
from ptft.text.sft_data import ChatDataModule

__all__ = ["ChatDataModule", "ChatFineTuner"]  # ChatDataModule re-exported: ``ptft.text.sft.ChatDataModule`` still works


class ChatFineTuner(TokenMeanLoss, HFModule, FineTuneModule):
    """Supervised fine-tuning of any ``AutoModelForCausalLM`` on conversations, loss on assistant tokens only.

    Validation reports ``val/loss`` (mean negative log-likelihood per reply token) and ``val/perplexity`` (its exp)
    and generates a greedy reply for the first ``num_samples`` validation prompts, logged as a W&B table
    (``val/samples``) or printed. Under gradient accumulation and DDP every reply token of an optimizer step weighs
    the same (:class:`ptft.core.token_loss.TokenMeanLoss`), as with transformers' ``num_items_in_batch``.
    ``ptft predict`` writes one reply per prompt (``prompt``, ``reply``).

    Args:
        model_name: Hugging Face hub name (``HuggingFaceTB/SmolLM2-135M-Instruct``), a local folder written by
            ``save_pretrained``, or a ptft checkpoint (``.ckpt``). Also the default tokenizer of the data.
        pretrained: Load the pretrained weights. ``False`` builds the architecture with random weights.
        model_config: Values overriding the model's config (``{attn_implementation: flash_attention_2}``). A dict
            holding ``model_type`` is a complete config, used without reading ``model_name``'s (full checkpoints
            store the architecture this way, so they load without the hub).
        num_samples: Validation prompts answered (greedily) and shown after each validation; 0 turns it off.
        sample_max_new_tokens: Longest validation sample reply, in tokens.
        max_new_tokens: Longest reply written by ``ptft predict``, in tokens (greedy decoding).
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.FineTuneModule` (``optimizer``,
            ``scheduler``, ``l1``, ``l2_sp``, ``peft``, ``checkpoint_weights``, ``compile``,
            ``gradient_checkpointing``: less memory, ~30% slower steps).
    """

    needs_processor = True  # an export without its tokenizer is refused (ptft.core.hf.HFModule.save_model)

    #: The language-model head is pretrained (and often tied to the embeddings): not a new head.
    pretrained_heads = ("lm_head",)

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        model_config: dict[str, Any] | None = None,
        num_samples: int = 1,
        sample_max_new_tokens: int = 64,
        max_new_tokens: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from transformers import AutoModelForCausalLM

        self.model_name = model_name
        self.num_samples = num_samples
        self.sample_max_new_tokens = sample_max_new_tokens
        self.max_new_tokens = max_new_tokens
        self.samples: list[dict[str, Any]] = []
        self._own_tokenizer: Any = None
        model = build_hf_model(AutoModelForCausalLM, model_name, pretrained, model_config)
        # transformers 5 loads weights in their stored dtype (bf16 for most LLMs): train fp32 master weights and let
        # the trainer's precision setting (bf16-mixed…) decide the compute dtype.
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
            model = model.float()
        architecture = model.config.to_dict()
        self.set_model(model)
        self._save_hparams(pretrained=False, model_config=architecture)

    # --- training ---------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
        return self.model(**inputs, use_cache=False)

    def loss_tokens(self, batch: dict[str, Any]) -> int:
        """The labelled reply tokens but the first of a row: the model predicts token t + 1 from tokens up to t."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        loss = self(batch).loss
        return loss, loss.detach()

    def build_metrics(self) -> MetricCollection | None:
        return MetricCollection({"perplexity": Perplexity()})

    def update_metrics(self, stage: str, outputs: Any, batch: dict[str, Any]) -> None:
        if stage != "train":  # perplexity is an evaluation metric
            self.metrics[f"{stage}_"]["perplexity"].update(outputs, weight=self.loss_tokens(batch))

    def epoch_metrics(self, stage: str) -> dict[str, torch.Tensor] | None:
        metric = self.metrics[f"{stage}_"]["perplexity"]
        return {f"{stage}/perplexity": metric.compute()} if metric.update_count else None

    # --- generation -------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The data module's tokenizer (with its chat template), or the model's own when there is no data module."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(datamodule, "tokenizer", None) is not None:
            return datamodule.tokenizer
        if self._own_tokenizer is None:
            from transformers import AutoTokenizer

            from ptft.core.hub import load_pretrained, resolve_model_name

            self._own_tokenizer = load_pretrained(AutoTokenizer.from_pretrained, resolve_model_name(self.model_name),
                                                  "tokenizer")
        return self._own_tokenizer

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> list[str]:
        """Greedy replies to a batch of left-padded prompts, decoded without special tokens."""
        tokenizer = self.tokenizer
        stop = self.model.generation_config.eos_token_id
        stop = ([] if stop is None else [stop] if isinstance(stop, int) else list(stop))
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop:
            stop.append(tokenizer.eos_token_id)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
            temperature=None, top_p=None, top_k=None, eos_token_id=stop or None, pad_token_id=tokenizer.pad_token_id,
        )
        return [text.strip() for text in tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)]

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()  # perplexity (epoch_metrics)
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.trainer.sanity_checking or self.num_samples <= 0 or not hasattr(datamodule, "sample_prompts"):
            return
        self.samples = []
        # Every rank generates (sharded models need all ranks in each forward); rank 0 reports.
        for sample in datamodule.sample_prompts(self.num_samples):
            ids = torch.tensor([sample["input_ids"]], device=self.device)
            reply = self.generate(ids, torch.ones_like(ids), self.sample_max_new_tokens)[0]
            self.samples.append({"prompt": sample["prompt"], "reply": reply, "reference": sample["reference"]})
        logger = self.logger
        if logger is not None and hasattr(logger, "log_text"):  # W&B: a table per validation
            columns = ["step", "prompt", "reply", "reference"]
            data = [[self.global_step, s["prompt"], s["reply"], s["reference"]] for s in self.samples]
            logger.log_text(key="val/samples", columns=columns, data=data)
        else:
            for s in self.samples:
                rank_zero_info(f"[step {self.global_step}] prompt: {s['prompt']!r}\n  reply: {s['reply']!r}\n"
                               f"  reference: {s['reference']!r}")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Greedy replies (up to ``max_new_tokens``) to the batch's prompts."""
        replies = self.generate(batch["input_ids"], batch["attention_mask"], self.max_new_tokens)
        return {"prompts": batch["prompt"], "replies": replies}

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """``prompt`` (the last message before the reply) and ``reply``."""
        return [{"prompt": p, "reply": r} for p, r in zip(outputs["prompts"], outputs["replies"])]

    # --- export -----------------------------------------------------------------------------------------------
    def save_model(self, model: torch.nn.Module, folder: str) -> None:
        """``save_pretrained`` plus the tokenizer, with the fallback chat template when the tokenizer has none."""
        super().save_model(model, folder)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError):
            return
        if tokenizer.chat_template is None:
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
            tokenizer.save_pretrained(folder)
