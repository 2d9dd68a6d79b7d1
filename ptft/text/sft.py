"""Supervised fine-tuning (SFT) of causal language models on conversations: loss on the assistant's tokens only.

:class:`ChatDataModule` renders each conversation with the tokenizer's chat template and labels only what the
assistant turns add; :class:`ChatFineTuner` trains any ``AutoModelForCausalLM``, reports validation loss and
perplexity, prints (or logs to W&B) a greedy reply at each validation, and writes one reply per prompt on predict.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric, MetricCollection

from ptft.core.errors import PtftError
from ptft.core.hf import HFModule, build_hf_model
from ptft.core.module import FineTuneModule
from ptft.text.base import TextDataModule, column, sort_by_length

ROLES = ("system", "user", "assistant")

#: The format used when the tokenizer has no chat template (Zephyr's): every turn is ``<|role|>``, a newline, the
#: text and the end-of-sequence token; a reply is prompted by ``<|assistant|>`` and a newline.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + (eos_token if eos_token else '') + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# --- conversations ----------------------------------------------------------------------------------------------
def as_conversations(
    ds: Any, messages_column: str, prompt_column: str | None, response_column: str | None, system_prompt: str | None
) -> list[list[dict[str, Any]]]:
    """Every row as a list of ``{role, content}`` messages (prompt/response pairs become a user and an assistant turn).

    ``system_prompt`` is prepended to conversations that have no system message; ``response_column=None`` (predict)
    leaves the assistant turn out.
    """
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if prompt_column is not None:
        prompts = column(ds, prompt_column)
        responses = column(ds, response_column) if response_column else [None] * len(prompts)
        reply = (lambda r: [{"role": "assistant", "content": r}]) if response_column else (lambda r: [])
        return [system + [{"role": "user", "content": p}] + reply(r) for p, r in zip(prompts, responses)]
    conversations = column(ds, messages_column)
    if system:
        conversations = [
            c if not isinstance(c, list) or any(isinstance(m, dict) and m.get("role") == "system" for m in c)
            else system + c
            for c in conversations
        ]
    return conversations


def check_conversations(conversations: list[Any], where: str, need_reply: bool, pairs: bool) -> None:
    """One-line error naming how many rows have a problem and the first of them; nothing if all are well-formed."""
    problems: dict[str, list[int]] = {}
    bad_roles: list[str] = []
    reply = "response" if pairs else "assistant reply"
    for i, conv in enumerate(conversations):
        if not isinstance(conv, list) or not conv or not all(isinstance(m, dict) and "role" in m for m in conv):
            problems.setdefault("a conversation that is not a list of {role, content} messages", []).append(i)
            continue
        roles = [m.get("role") for m in conv]
        odd = [r for r in roles if r not in ROLES]
        if odd:
            problems.setdefault("a role other than system/user/assistant", []).append(i)
            bad_roles.append(repr(odd[0]))
            continue
        if any(not isinstance(m.get("content"), str) or not m["content"].strip() for m in conv if m["role"] != "assistant"):
            problems.setdefault("an empty prompt" if pairs else "an empty or missing user/system message", []).append(i)
        if need_reply:
            replies = [m.get("content") for m in conv if m["role"] == "assistant"]
            if not replies:
                problems.setdefault("no assistant turn", []).append(i)
            elif any(not isinstance(r, str) or not r.strip() for r in replies):
                problems.setdefault(f"an empty {reply}", []).append(i)
        elif all(r == "assistant" for r in roles):
            problems.setdefault("no prompt (only assistant turns)", []).append(i)
    for problem, rows in problems.items():
        detail = f", role {bad_roles[0]}" if problem.startswith("a role") else ""
        raise PtftError(
            f"{where}: {problem} in {len(rows)} of {len(conversations)} rows (first: row {rows[0]}{detail}); "
            "fix or drop those rows"
        )


def prompt_part(conversation: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """What a reply is generated from (the conversation without a final assistant turn) and that turn's text."""
    if conversation[-1]["role"] == "assistant":
        return conversation[:-1], conversation[-1]["content"]
    return conversation, None


def render(tokenizer: Any, template: str, messages: list[dict[str, Any]], generation_prompt: bool, row: int) -> str:
    """The chat template applied to ``messages``, as text; a template's own error becomes a one-line error."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja2's TemplateError, raise_exception(...) of strict templates
        raise PtftError(f"the chat template rejects conversation row {row}: {str(err).splitlines()[0]}") from err


def assistant_spans(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], row: int
) -> tuple[str, list[tuple[int, int]], int]:
    """The rendered conversation, the character span of each assistant turn in it, and how many turns were skipped.

    A turn's span is what rendering ``messages[:i + 1]`` adds to rendering ``messages[:i]`` with the generation
    prompt: the reply and its end-of-turn marker, without the header the prompt already holds (works with any
    template, with or without ``{% generation %}`` markers). Trailing whitespace after the end-of-turn marker is not
    learned. A turn is skipped when the template renders it differently once later turns follow (e.g. templates
    that drop earlier reasoning), since its tokens would then not be the ones in the training text.
    """
    text = render(tokenizer, template, messages, False, row)
    spans, skipped = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:i], True, row)
        through = text if i == len(messages) - 1 else render(tokenizer, template, messages[: i + 1], False, row)
        if not (text.startswith(through) and through.startswith(before) and len(through) > len(before)):
            skipped += 1
            continue
        added = through[len(before):]
        spans.append((len(before), len(before) + len(added.rstrip() or added)))
    return text, spans, skipped


def label_tokens(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """``input_ids`` where a token overlaps an assistant span, -100 (ignored by the loss) elsewhere."""
    return [
        token if any(s < end and e > start for start, end in spans) else -100
        for token, (s, e) in zip(input_ids, offsets)
    ]


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


class Perplexity(MeanMetric):
    """``exp`` of the mean per-token negative log-likelihood (update with a batch's mean loss and its token count)."""

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


class ChatFineTuner(HFModule, FineTuneModule):
    """Supervised fine-tuning of any ``AutoModelForCausalLM`` on conversations, loss on assistant tokens only.

    Validation reports ``val/loss`` and ``val/ppl`` (per-token perplexity of the replies) and generates a greedy
    reply for the first ``num_samples`` validation prompts, logged as a W&B table (``val/samples``) or printed.
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
        gradient_checkpointing: Recompute activations in the backward pass (less memory, ~30% slower).
        **kwargs: The shared fine-tuning arguments of :class:`ptft.core.FineTuneModule` (``optimizer``,
            ``scheduler``, ``l1``, ``l2_sp``, ``peft``, ``checkpoint_weights``, ``compile``).
    """

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
        gradient_checkpointing: bool = False,
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
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        architecture = model.config.to_dict()
        self.set_model(model)
        self._save_hparams(pretrained=False, model_config=architecture)

    # --- training ---------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
        return self.model(**inputs, use_cache=False)

    def step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, Any]:
        loss = self(batch).loss
        tokens = (batch["labels"][:, 1:] != -100).sum()  # the model predicts token t + 1 from tokens up to t
        return loss, (loss.detach(), tokens)

    def build_metrics(self) -> MetricCollection | None:
        return MetricCollection({"ppl": Perplexity()})

    def update_metrics(self, stage: str, outputs: Any, batch: dict[str, Any]) -> None:
        if stage == "train":
            return
        loss, tokens = outputs
        metrics = self.metrics[f"{stage}_"]
        metrics["ppl"].update(loss, weight=tokens)
        self.log_dict(metrics, batch_size=self.batch_size_of(batch))

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
