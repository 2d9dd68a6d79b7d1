"""The data of supervised fine-tuning (SFT): conversations rendered with a chat template, assistant-only labels,
optional packing, left-padded prompts for generation."""

from __future__ import annotations

import bisect
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ptft.core.errors import PtftError
from ptft.text.base import TextDataModule, column, sort_by_length
from ptft.text.chat import (
    FALLBACK_CHAT_TEMPLATE,
    as_conversations,
    assistant_spans,
    check_conversations,
    label_tokens,
    prompt_part,
    render,
)

def pack_examples(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: example indices grouped into blocks of at most ``capacity`` tokens, no example split."""
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, block index), sorted
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(blocks)
            blocks.append([])
        blocks[b].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], b))
    return [sorted(block) for block in blocks]


class ChatDataModule(TextDataModule):
    """Conversations (or prompt/response pairs) for supervised fine-tuning, from files or a Hugging Face dataset.

    Each row is rendered with the tokenizer's chat template (``apply_chat_template``); tokenizers without one use
    :data:`FALLBACK_CHAT_TEMPLATE` (``<|user|>\\n…</s>\\n<|assistant|>\\n…</s>\\n``). Only the tokens the assistant
    turns add are learned (labels -100 elsewhere). Rows are truncated to ``max_length`` tokens; a row left without
    any assistant token is an error.

    Args:
        messages_column: Column holding each conversation as a list of ``{role, content}`` messages (roles
            ``system``, ``user``, ``assistant``), Hugging Face's chat format.
        prompt_column: Column with a prompt, for prompt/response pairs instead of ``messages_column``.
        response_column: Column with the reply to ``prompt_column``.
        system_prompt: A system message prepended to every conversation that has none.
        chat_template: A Jinja chat template replacing the tokenizer's (not saved by ``ptft export``: put it in the
            tokenizer folder to keep it).
        packing: Concatenate training examples into blocks of up to ``max_length`` tokens (best-fit, no example
            split), with ``position_ids`` restarting at each example and no attention mask. Whether an example then
            sees the ones before it in its block depends on the model's attention: see docs/text.md (chat SFT, Packing).
        group_by_length: Batch conversations of similar length together (less padding); ignored with packing.
        **kwargs: The shared text data arguments of :class:`ptft.text.base.TextDataModule` (``train_file``,
            ``val_file``, ``test_file``, ``predict_file``, ``dataset``, ``dataset_config``, splits,
            ``rename_columns``, ``tokenizer``, ``max_length``, ``batch_size``, ``eval_batch_size``,
            ``val_fraction``, ``seed``, ``num_workers``).
    """

    def __init__(
        self,
        messages_column: str = "messages",
        prompt_column: str | None = None,
        response_column: str = "response",
        system_prompt: str | None = None,
        chat_template: str | None = None,
        packing: bool = False,
        group_by_length: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(logger=False)
        self.messages_column = messages_column
        self.prompt_column = prompt_column
        self.response_column = response_column
        self.system_prompt = system_prompt
        self.chat_template = chat_template
        self.packing = packing
        self.group_by_length = group_by_length
        self._val_source: Any = None

    # --- columns and tokenizer --------------------------------------------------------------------------------
    def columns(self, split: str) -> dict[str, str]:
        if self.prompt_column is None:
            return {self.messages_column: "messages_column (or prompt_column and response_column for pairs)"}
        needed = {self.prompt_column: "prompt_column"}
        if split != "predict":
            needed[self.response_column] = "response_column"
        return needed

    def load_tokenizer(self) -> Any:
        fresh = self.tokenizer is None
        tokenizer = super().load_tokenizer()
        if fresh:
            if self.chat_template is not None:
                tokenizer.chat_template = self.chat_template
            elif tokenizer.chat_template is None:
                rank_zero_info(f"{self.tokenizer_name} has no chat template: using ptft's fallback format (<|user|> …)")
                tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
            if tokenizer.pad_token is None:  # padding is masked out of the loss, so any token will do
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
            if not getattr(tokenizer, "is_fast", False):
                raise PtftError(f"{self.tokenizer_name}: SFT needs a fast tokenizer (character offsets of tokens)")
        return tokenizer

    def conversations(self, ds: Any, split: str) -> list[list[dict[str, Any]]]:
        """The split's rows as checked conversations (one-line error on malformed rows)."""
        response = self.response_column if split != "predict" else None
        conversations = as_conversations(ds, self.messages_column, self.prompt_column, response, self.system_prompt)
        where = self.sources.describe(split) if split != "val" or self.files.get("val") else "validation data"
        check_conversations(conversations, where, need_reply=split != "predict", pairs=self.prompt_column is not None)
        return conversations

    # --- encoding ---------------------------------------------------------------------------------------------
    def encode(self, ds: Any, split: str) -> Any:
        import datasets

        tokenizer = self.load_tokenizer()
        template, max_length = tokenizer.chat_template, self.max_length
        conversations = self.conversations(ds, split)
        if split == "val":
            self._val_source = conversations
        if split == "predict":
            prompts = [prompt_part(c)[0] for c in conversations]
            texts = [render(tokenizer, template, p, True, i) for i, p in enumerate(prompts)]
            enc = tokenizer(texts, add_special_tokens=False)
            shown = [next(m["content"] for m in reversed(p) if m["role"] != "assistant") for p in prompts]
            return datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "prompt": shown})

        def tokenize(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            rendered = [assistant_spans(tokenizer, template, c, i) for c, i in zip(batch["conversation"], indices)]
            enc = tokenizer([t for t, _, _ in rendered], add_special_tokens=False, return_offsets_mapping=True,
                            truncation=True, max_length=max_length)
            labels = [label_tokens(ids, offsets, spans)
                      for ids, offsets, (_, spans, _) in zip(enc["input_ids"], enc["offset_mapping"], rendered)]
            return {
                "input_ids": enc["input_ids"],
                "labels": labels,
                "length": [len(ids) for ids in enc["input_ids"]],
                "learned": [sum(t != -100 for t in row) for row in labels],
                "turns": [len(spans) for _, spans, _ in rendered],
                "skipped": [skipped for _, _, skipped in rendered],
            }

        table = datasets.Dataset.from_dict({"conversation": conversations})
        encoded = table.map(tokenize, batched=True, with_indices=True, remove_columns=["conversation"],
                            desc=f"Tokenizing {split}")
        self._check_learnable(encoded, split)
        encoded = encoded.remove_columns(["learned", "turns", "skipped"])
        if split == "train" and self.packing:
            return self.pack(encoded)
        return sort_by_length(encoded) if split in ("val", "test") else encoded

    def _check_learnable(self, encoded: Any, split: str) -> None:
        learned, turns, skipped = column(encoded, "learned"), column(encoded, "turns"), column(encoded, "skipped")
        where = self.sources.describe(split) if split != "val" or self.files.get("val") else "validation data"
        unrendered = [i for i, t in enumerate(turns) if t == 0]
        if unrendered:
            raise PtftError(
                f"{where}: no assistant turn that the chat template renders the same with and without the turns "
                f"after it, in {len(unrendered)} of {len(turns)} rows (first: row {unrendered[0]}); give "
                "data.init_args.chat_template or keep one assistant turn per row"
            )
        empty = [i for i, n in enumerate(learned) if n == 0]
        if empty:
            raise PtftError(
                f"{where}: the prompt fills all max_length={self.max_length} tokens, leaving no assistant token to "
                f"learn, in {len(empty)} of {len(learned)} rows (first: row {empty[0]}); raise "
                "data.init_args.max_length or shorten those prompts"
            )
        if sum(skipped):
            rank_zero_warn(
                f"{where}: {sum(skipped)} assistant turns are not learned: the chat template renders them differently "
                "once later turns follow (only turns rendered identically are trained)"
            )

    def pack(self, encoded: Any) -> Any:
        """Training examples packed into blocks of up to ``max_length`` tokens, ``position_ids`` restarting per example."""
        import datasets

        ids, labels, lengths = column(encoded, "input_ids"), column(encoded, "labels"), column(encoded, "length")
        blocks = pack_examples(lengths, self.max_length)
        packed: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "length": []}
        for block in blocks:
            packed["input_ids"].append([t for i in block for t in ids[i]])
            packed["labels"].append([t for i in block for t in labels[i]])
            packed["position_ids"].append([p for i in block for p in range(lengths[i])])
            packed["length"].append(sum(lengths[i] for i in block))
        fill = sum(lengths) / (len(blocks) * self.max_length)
        rank_zero_info(f"packed {len(lengths)} training examples into {len(blocks)} blocks of up to "
                       f"{self.max_length} tokens ({fill:.0%} full)")
        return datasets.Dataset.from_dict(packed)

    def sample_prompts(self, n: int) -> list[dict[str, Any]]:
        """The first ``n`` validation conversations up to their last reply: ``prompt`` (its last message),
        ``input_ids`` (rendered with the generation prompt) and ``reference`` (the reply in the data)."""
        if self._val_source is None:
            return []
        tokenizer = self.load_tokenizer()
        samples = []
        for i, conversation in enumerate(self._val_source[:n]):
            messages, reference = prompt_part(conversation)
            text = render(tokenizer, tokenizer.chat_template, messages, True, i)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            samples.append({"prompt": messages[-1]["content"], "input_ids": ids, "reference": reference})
        return samples

    # --- batches ----------------------------------------------------------------------------------------------
    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """Right-padded training / evaluation batches; left-padded prompts for generation (predict)."""
        pad_id = self.tokenizer.pad_token_id
        width = max(len(f["input_ids"]) for f in features)

        def pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
            return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows])

        ids = [f["input_ids"] for f in features]
        if "labels" not in features[0]:  # predict: prompts to continue, padded on the left
            mask = pad([[1] * len(r) for r in ids], 0, left=True)
            return {"input_ids": pad(ids, pad_id, left=True), "attention_mask": mask,
                    "prompt": [f["prompt"] for f in features]}
        batch = {"input_ids": pad(ids, pad_id), "labels": pad([f["labels"] for f in features], -100)}
        if "position_ids" in features[0]:
            # Packed: no attention mask (padding sits after every real token, which causal attention never sees),
            # so kernels can tell examples apart by their restarting positions.
            batch["position_ids"] = torch.tensor(
                [f["position_ids"] + list(range(width - len(f["position_ids"]))) for f in features]
            )
        else:
            batch["attention_mask"] = pad([[1] * len(r) for r in ids], 0)
        return batch

    def train_lengths(self) -> list[int] | None:
        if self.packing or not self.group_by_length:
            return None
        return column(self.datasets["train"], "length")
