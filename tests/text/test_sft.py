"""Chat SFT: assistant-only labels, chat template and fallback, truncation, packing, learning, predict, recipes, errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import minilm_dir
from helpers import trainer

from ptft.core.errors import PtftError
from ptft.core.optim import OptimizerConfig, SchedulerConfig
from ptft.text.sft import ChatDataModule, ChatFineTuner

# A small ChatML-like template: "user : <text> </s> assistant : <reply> </s> "
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
PAIRS = [("hot", "cold"), ("big", "small"), ("up", "down"), ("left", "right"), ("fast", "slow"), ("day", "night"),
         ("black", "white"), ("old", "new")]
OPPOSITES = {**dict(PAIRS), **{b: a for a, b in PAIRS}}
WORDS = ["user", "assistant", "system", ":", "opposite", "of", "answer", "with", "the", "tool", *OPPOSITES]


def opposite_chat(rng: random.Random, turns: int, system: bool = False) -> list[dict[str, str]]:
    """The assistant answers each 'opposite of X' with X's opposite (16 words: chance is 1/16)."""
    messages = [{"role": "system", "content": "answer with the opposite"}] if system else []
    for _ in range(turns):
        word = rng.choice(sorted(OPPOSITES))
        messages += [{"role": "user", "content": f"opposite of {word}"}, {"role": "assistant", "content": OPPOSITES[word]}]
    return messages


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": opposite_chat(rng, turns=1 + i % 2, system=i % 3 == 0)} for i in range(n)]


def save_tiny_llama(path: Path, tokenizer) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.2,  # 0.02 plateaus for 200 steps
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 2-layer hidden-32 Llama with a word-level tokenizer (one token per word) and TEMPLATE."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["[PAD]", "[UNK]", "</s>", *WORDS]))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    tokenizer.chat_template = TEMPLATE
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture
def chat_files(tmp_path: Path) -> dict[str, str]:
    return {"train": write_jsonl(tmp_path / "train.jsonl", chat_rows(128, 1)),
            "val": write_jsonl(tmp_path / "val.jsonl", chat_rows(16, 2))}


def setup_data(tmp_path: Path, rows: list[dict], tokenizer: str, **kwargs) -> ChatDataModule:
    train = write_jsonl(tmp_path / "rows.jsonl", rows)
    dm = ChatDataModule(train_file=train, val_file=train, tokenizer=tokenizer, batch_size=len(rows), **kwargs)
    dm.setup("fit")
    return dm


def labelled(dm: ChatDataModule, row: int = 0) -> tuple[list[str], list[str]]:
    """(all tokens, the labelled tokens) of a training row."""
    example = dm.datasets["train"][row]
    tokens = dm.tokenizer.convert_ids_to_tokens(example["input_ids"])
    return tokens, [t for t, label in zip(tokens, example["labels"]) if label != -100]


def test_only_assistant_tokens_are_labelled_with_the_chat_template(chat_model, tmp_path):
    messages = [
        {"role": "system", "content": "answer with the opposite"},
        {"role": "user", "content": "opposite of up"}, {"role": "assistant", "content": "down"},
        {"role": "user", "content": "opposite of cold"}, {"role": "assistant", "content": "hot"},
    ]
    dm = setup_data(tmp_path, [{"messages": messages}], chat_model)
    tokens, learned = labelled(dm)
    assert " ".join(tokens) == ("system : answer with the opposite </s> user : opposite of up </s> assistant : down </s> "
                                "user : opposite of cold </s> assistant : hot </s>")
    labels = dm.datasets["train"][0]["labels"]
    assert [i for i, label in enumerate(labels) if label != -100] == [15, 16, 25, 26]  # the replies and their </s>
    assert learned == ["down", "</s>", "hot", "</s>"]


def test_subword_tokenizer_labels_and_fallback_format(tmp_path):
    """MiniLM's wordpiece tokenizer: with a template given, and with ptft's fallback format (it has no template)."""
    rows = [{"prompt": "Is the sky blue?", "response": "Yes, usually."}]
    dm = setup_data(tmp_path, rows, str(minilm_dir()), prompt_column="prompt", system_prompt="Be brief.",
                    chat_template=TEMPLATE.replace("eos_token", "'[SEP]'"))
    tokens, learned = labelled(dm)
    assert tokens[:5] == ["system", ":", "be", "brief", "."]
    assert learned == ["yes", ",", "usually", ".", "[SEP]"]

    fallback = setup_data(tmp_path, rows, str(minilm_dir()), prompt_column="prompt")
    text = fallback.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                  add_generation_prompt=True)
    assert text == "<|user|>\nHi\n<|assistant|>\n"  # MiniLM has no end-of-sequence token to close turns with
    tokens, learned = labelled(fallback)
    assert tokens[:6] == ["<", "|", "user", "|", ">", "is"]
    assert learned == ["yes", ",", "usually", "."]


def test_turns_a_template_renders_differently_later_are_skipped(chat_model, tmp_path):
    """A template that hides earlier replies (as reasoning templates drop earlier thinking): only the last is learned."""
    hiding = TEMPLATE.replace("{{ m['content'] }}", "{{ '...' if m['role'] == 'assistant' and not loop.last else m['content'] }}")
    rng = random.Random(0)
    with pytest.warns(UserWarning, match="1 assistant turns are not learned"):
        dm = setup_data(tmp_path, [{"messages": opposite_chat(rng, 2)}], chat_model, chat_template=hiding)
    tokens, learned = labelled(dm)
    assert learned == [tokens[-2], "</s>"] and tokens[-2] in OPPOSITES


def test_truncation_and_prompts_longer_than_max_length(chat_model, tmp_path):
    rng = random.Random(0)
    dm = setup_data(tmp_path, [{"messages": opposite_chat(rng, 2)}], chat_model, max_length=9)
    tokens, learned = labelled(dm)
    assert len(tokens) == 9 and learned == [tokens[-1]]  # cut after the first reply's word: no </s>, no 2nd turn
    rows = [{"messages": opposite_chat(rng, 1)} for _ in range(4)]
    rows[1]["messages"][0]["content"] = rows[2]["messages"][0]["content"] = "opposite of " + "hot " * 20
    with pytest.raises(PtftError, match=r"fills all max_length=16 tokens.* in 2 of 4 rows \(first: row 1\)"):
        setup_data(tmp_path, rows, chat_model, max_length=16)


def test_packing_keeps_labels_and_isolates_examples(chat_model, tmp_path):
    rows = chat_rows(12, 3)
    plain = setup_data(tmp_path, rows, chat_model)
    packed = setup_data(tmp_path, rows, chat_model, packing=True, max_length=40)
    blocks = packed.datasets["train"]
    assert len(blocks) < len(rows) and max(blocks["length"]) <= 40
    assert sum(blocks["length"]) == sum(plain.datasets["train"]["length"])
    batch = packed.collate([blocks[i] for i in range(len(blocks))])
    assert "attention_mask" not in batch
    # every example of a block restarts its positions at 0; its labels are the unpacked example's labels
    first = blocks[0]
    starts = [i for i, p in enumerate(first["position_ids"]) if p == 0]
    assert len(starts) >= 2
    examples = {tuple(r["input_ids"]): r["labels"] for r in plain.datasets["train"]}
    for a, b in zip(starts, [*starts[1:], len(first["input_ids"])]):
        assert examples[tuple(first["input_ids"][a:b])] == first["labels"][a:b]
    # transformers 5 turns restarting positions (no attention mask, no cache) into a block-diagonal mask for Llama
    model = ChatFineTuner(chat_model).eval()
    with torch.no_grad():
        together = model({k: v[:1] for k, v in batch.items()}).logits[0]
        for a, b in zip(starts, [*starts[1:], len(first["input_ids"])]):
            alone = model({"input_ids": torch.tensor([first["input_ids"][a:b]])}).logits[0]
            torch.testing.assert_close(together[a:b], alone, atol=1e-4, rtol=1e-4)


def test_learns_to_answer_and_predicts(chat_model, chat_files, tmp_path, caplog):
    import lightning as L
    from lightning.pytorch.loggers import Logger

    from ptft.core import WritePredictions

    class RecordingLogger(Logger):
        """Receives ``log_text`` as W&B's logger does."""

        name, version = "rec", 0

        def __init__(self):
            super().__init__()
            self.tables = []

        def log_hyperparams(self, params, *args, **kwargs): ...
        def log_metrics(self, metrics, step=None): ...

        def log_text(self, key, columns, data):
            self.tables.append((key, columns, data))

    model = ChatFineTuner(chat_model, optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.0),
                          scheduler=SchedulerConfig(name="constant", warmup_ratio=0.0), num_samples=16,
                          sample_max_new_tokens=4)
    assert not any(model.is_head_parameter(n) for n, _ in model.model.named_parameters())
    dm = ChatDataModule(train_file=chat_files["train"], val_file=chat_files["val"], batch_size=16, max_length=32)
    dm.connect(model)

    def accuracy() -> float:
        return sum(s["reply"] == s["reference"] for s in model.samples) / len(model.samples)

    with caplog.at_level("INFO"):  # without a text-capable logger, samples are printed
        before = trainer(tmp_path, inference_mode=False).validate(model, dm, verbose=False)[0]
    assert "reference: " in caplog.text and len(model.samples) == 16
    acc_before = accuracy()
    logger = RecordingLogger()
    fit = trainer(tmp_path, max_steps=60, logger=logger, inference_mode=False, check_val_every_n_epoch=100)
    fit.fit(model, dm)
    after = fit.validate(model, dm, verbose=False)[0]
    acc_after = accuracy()
    print(f"reply accuracy {acc_before:.2f} -> {acc_after:.2f}, val/loss {before['val/loss']:.3f} -> "
          f"{after['val/loss']:.3f}, val/perplexity {before['val/perplexity']:.1f} -> {after['val/perplexity']:.2f}")
    assert acc_before <= 0.2 and acc_after >= 0.8
    assert after["val/loss"] < 0.5 * before["val/loss"]
    key, columns, data = logger.tables[-1]
    assert key == "val/samples" and columns == ["step", "prompt", "reply", "reference"] and len(data) == 16

    # val/perplexity is exp of the mean negative log-likelihood over all reply tokens
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits = model(batch).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            nll += torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum").item()
            count += int((labels != -100).sum())
    assert after["val/perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)

    # predict: prompts of different lengths, left-padded in one batch, give the replies they get one by one
    rng = random.Random(5)
    chats = [opposite_chat(rng, turns=1 + i % 2, system=i % 3 == 0) for i in range(12)]
    prompts = [c[:-1] for c in chats]  # up to the last user message
    model.max_new_tokens = 4
    replies = {}
    for batch_size in (12, 1):
        predict = ChatDataModule(predict_file=write_jsonl(tmp_path / "p.jsonl", [{"messages": p} for p in prompts]),
                                 batch_size=batch_size)
        predict.connect(model)
        out = tmp_path / f"predictions-{batch_size}.jsonl"
        L.Trainer(logger=False, callbacks=[WritePredictions(str(out))], enable_progress_bar=False).predict(model, predict)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["prompt"] for r in rows] == [p[-1]["content"] for p in prompts]
        replies[batch_size] = [r["reply"] for r in rows]
    assert replies[12] == replies[1]
    correct = sum(r == c[-1]["content"] for r, c in zip(replies[12], chats))
    print(f"predict: {correct}/12 replies right")
    assert correct >= 9


def test_prompt_response_pairs_to_predict(chat_model, tmp_path):
    rows = [{"prompt": "opposite of up", "id": 1}, {"prompt": "opposite of old opposite of big", "id": 2}]
    dm = ChatDataModule(predict_file=write_jsonl(tmp_path / "p.jsonl", rows), prompt_column="prompt",
                        system_prompt="answer with the opposite", tokenizer=chat_model, batch_size=2)
    dm.setup("predict")
    batch = dm.collate([dm.datasets["predict"][i] for i in range(2)])
    assert batch["prompt"] == ["opposite of up", "opposite of old opposite of big"]
    assert batch["attention_mask"].tolist()[0] == [0] * 3 + [1] * 15  # left padding: prompts end together
    assert dm.tokenizer.decode(batch["input_ids"][0, 3:]) == (
        "system : answer with the opposite </s> user : opposite of up </s> assistant :")


@pytest.mark.parametrize("recipe", ["recipes/text/sft.yaml", "recipes/text/sft-lora.yaml"])
def test_recipe_trains_two_steps(recipe, run_recipe, chat_model, chat_files):
    cli = run_recipe(recipe, [f"--model.init_args.model_name={chat_model}",
                              f"--data.init_args.train_file={chat_files['train']}",
                              f"--data.init_args.val_file={chat_files['val']}", "--data.init_args.max_length=64",
                              "--data.init_args.batch_size=4", "--trainer.val_check_interval=2",
                              "--model.init_args.sample_max_new_tokens=3"])
    assert cli.trainer.global_step == 2
    assert len(cli.model.samples) == 2  # validated once, with samples
    logged = cli.trainer.callback_metrics
    assert logged["val/perplexity"].item() == pytest.approx(math.exp(logged["val/loss"].item()), rel=1e-5)
    trainable = [n for n, p in cli.model.model.named_parameters() if p.requires_grad]
    if "lora" in recipe:
        assert trainable and all("lora_" in n for n in trainable)
    else:
        assert len(trainable) == len(list(cli.model.model.parameters()))


def test_untied_lm_head_is_not_a_new_head():
    config = {"model_type": "llama", "vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "intermediate_size": 64, "tie_word_embeddings": False}
    model = ChatFineTuner("unused", model_config=config)
    assert "lm_head.weight" in dict(model.model.named_parameters())
    assert model.head_modules(model.model) == []
    layers = model.layer_ids()
    assert layers["lm_head.weight"] == max(layers.values())  # with the last block for layer-wise learning rates


GOOD_CHAT = {"messages": [{"role": "user", "content": "opposite of up"}, {"role": "assistant", "content": "down"}]}
GOOD_PAIR = {"prompt": "opposite of up", "response": "down"}
BAD_INPUTS = [  # (rows, data arguments, error)
    ([GOOD_PAIR] * 3, {}, r"has no column 'messages'.*set data.init_args.messages_column \(or prompt_column and"),
    ([{"prompt": "a", "answer": "b"}] * 3, {"prompt_column": "prompt"}, r"has no column 'response'.*response_column"),
    ([GOOD_CHAT, {"messages": [{"role": "user", "content": "a"}]}, GOOD_CHAT], {},
     r"no assistant turn in 1 of 3 rows \(first: row 1\)"),
    ([GOOD_CHAT, GOOD_CHAT, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}],
     {}, r"an empty assistant reply in 1 of 3 rows \(first: row 2\)"),
    ([GOOD_PAIR, {"prompt": "a", "response": ""}, {"prompt": "b", "response": None}], {"prompt_column": "prompt"},
     r"an empty response in 2 of 3 rows \(first: row 1\)"),
    ([GOOD_CHAT, {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}], {},
     r"a role other than system/user/assistant in 1 of 2 rows \(first: row 1, role 'tool'\)"),
]


@pytest.mark.parametrize(("rows", "kwargs", "message"), BAD_INPUTS, ids=["messages", "response", "no-reply",
                                                                          "empty-reply", "empty-response", "role"])
def test_bad_inputs_are_one_line_errors(rows, kwargs, message, chat_model, tmp_path):
    with pytest.raises(PtftError, match=message) as err:
        setup_data(tmp_path, rows, chat_model, **kwargs)
    assert "\n" not in str(err.value)
