"""Recipe parity on generated data: extractive QA, seq2seq generation and chat SFT against Hugging Face Trainer.

No public data set is needed: each task writes a small learnable data set under ``bench/.work/generated`` from a
fixed data seed (the run seed moves the QA head's initialisation, dropout and batch order), and the seq2seq and SFT
models are tiny, randomly initialised ones saved once to a folder with a word-level tokenizer, so both systems start
from the same weights:

- ``qa``: pretrained all-MiniLM-L6-v2 answers "what color is it ?" from 10-25 filler words holding "it is <colour>"
  and a second, distracting colour word; exact match (%) of the best span on the validation questions.
- ``seq2seq``: a 2-layer T5 translates 4-9 number words given in random order and lists the translations in the
  numbers' order ("three one" -> "red green"); SacreBLEU (0-1) of the beam-searched output on the validation pairs.
- ``sft``: a 2-layer Llama continues "continue : w1 w2 w3 w4" with the next 6 words of a second-order Markov chain
  (each pair of words is followed by one of two words, 0.8 / 0.2); validation loss per reply token, whose floor is
  the chain's entropy (about 0.43: 6 x 0.50 nats over 6 words and </s>).

Each ptft system is the shipped recipe with only the model, the data files (and their columns), the epochs, the
batch size (``hf_args``' 32) and the evaluation batch size overridden, plus the learning rate, the same on both
sides: the recipes' rates are for thousands of steps on pretrained models, while these runs take 20 steps (QA) or
start from random weights (seq2seq, SFT). ptft validates once, after the last epoch (``ptft_fit``'s ``epochs``),
not four times per epoch as translation.yaml (``TrainTimer`` stops timing at a validation until the next epoch).
The references are HF Trainer with TrainingArguments at their defaults, as the example scripts (``run_qa``,
``run_translation``, a plain SFT loop with labels -100 on the prompt) run them, but those epochs, batch sizes and
rates.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

DATA_SEED = 0
BATCH, EVAL_BATCH = 32, 64  # hf_args' per-device batch sizes

QA_EPOCHS, QA_TRAIN, QA_VAL, QA_LR = 2, 320, 200, 1e-4
QA_MAX_ANSWER_TOKENS = 30  # squad.yaml's max_answer_length
FILLER = "the a this that service food screen room staff movie book app product was really quite very".split()
COLORS = "red green blue yellow purple orange black white pink brown turquoise crimson".split()

S2S_EPOCHS, S2S_TRAIN, S2S_VAL, S2S_LR = 3, 2000, 200, 1e-3
S2S_PREFIX = "translate English to German: "  # translation.yaml's source_prefix
S2S_BEAMS, S2S_MAX_NEW_TOKENS, S2S_LENGTH_PENALTY, S2S_MAX_LENGTH = 4, 128, 1.0, 128  # translation.yaml's
S2S_SOURCE = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
              "seventeen eighteen nineteen twenty").split()
S2S_TARGET = ("red blue green black white cat dog bird tree house car boat sun moon star rain snow wind fire "
              "stone").split()
DICTIONARY = dict(zip(S2S_SOURCE, S2S_TARGET))

SFT_EPOCHS, SFT_TRAIN, SFT_VAL, SFT_LR = 8, 2000, 200, 3e-3
SFT_REPLY_WORDS = 6
SFT_WORDS = "ant bee cat dog eel fox gnu hen ibis jay kiwi lark mole newt owl pig".split()
# "user : <prompt> </s> assistant : <reply> </s> ": one token per word
SFT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)

# task -> (metric, {system: description}, higher is better); "ptft" is the shipped recipe, "ref" the reference, the
# others the recipe with VARIANTS' changes (what it shipped before this benchmark)
TASKS: dict[str, tuple[str, dict[str, str], bool]] = {
    "qa": ("val exact match (%)", {
        "ptft": f"ptft `text/squad.yaml`, lr {QA_LR:g}",
        "ptft_bert": f"ptft `text/squad.yaml`, lr {QA_LR:g}, BERT's 10% warmup and weight decay 0.01",
        "ref": f"HF Trainer, `run_qa` defaults, lr {QA_LR:g}",
    }, True),
    "seq2seq": ("val BLEU (0-1)", {
        "ptft": f"ptft `text/translation.yaml`, lr {S2S_LR:g}",
        "ptft_before": f"ptft `text/translation.yaml` as shipped before (`group_by_length: true`, 5% warmup, weight "
                       f"decay 0.01), lr {S2S_LR:g}",
        "ptft_warmup": f"ptft `text/translation.yaml`, lr {S2S_LR:g}, 5% warmup and weight decay 0.01",
        "ref": f"HF Seq2SeqTrainer, `run_translation` defaults, lr {S2S_LR:g}",
    }, True),
    "sft": ("val loss per reply token", {
        "ptft": f"ptft `text/sft.yaml`, lr {SFT_LR:g}",
        "ref": f"HF Trainer defaults (labels -100 on the prompt), lr {SFT_LR:g}",
    }, False),
}


VARIANTS = {
    "ptft": [],
    "ptft_bert": ["--model.init_args.scheduler.warmup_ratio=0.1", "--model.init_args.optimizer.weight_decay=0.01"],
    "ptft_before": ["--data.init_args.group_by_length=true", "--model.init_args.scheduler.warmup_ratio=0.05",
                    "--model.init_args.optimizer.weight_decay=0.01"],
    "ptft_warmup": ["--model.init_args.scheduler.warmup_ratio=0.05", "--model.init_args.optimizer.weight_decay=0.01"],
}


def run(task: str, system: str, seed: int) -> dict:
    """One training run: ``{"seconds", "samples", "metric"}`` (training time and samples; the metric afterwards)."""
    ours, reference = RUNNERS[task]
    return reference(seed) if system == "ref" else ours(seed, VARIANTS[system])


# --- shared ------------------------------------------------------------------------------------------------------
def generated() -> Path:
    from recipe_parity import WORK

    return WORK / "generated"


def write_jsonl(name: str, rows: list[dict]) -> str:
    """``rows`` as ``generated()/name`` (written once: the rows are deterministic, and datasets caches by file)."""
    path = generated() / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.rename(path)
    return str(path)


def saved_model(name: str, build: Callable[[], tuple[Any, Any]]) -> str:
    """The folder ``generated()/name`` holding ``build()``'s (model, tokenizer), saved on first use."""
    import shutil

    import torch

    path = generated() / name
    if not (path / "config.json").exists():
        tmp = path.with_name(name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        torch.manual_seed(DATA_SEED)
        model, tokenizer = build()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(path)
    return str(path)


def recipe_args(recipe: str, model: str, seed: int, train: str, val: str) -> list[str]:
    """CLI arguments of a shipped recipe with the shared overrides: model, data files, batch sizes, seed."""
    from recipe_parity import REPO, WORK

    return ["--config", str(REPO / "recipes" / recipe), f"--model.init_args.model_name={model}",
            f"--data.init_args.train_file={train}", f"--data.init_args.val_file={val}",
            f"--data.init_args.batch_size={BATCH}", f"--data.init_args.eval_batch_size={EVAL_BATCH}",
            f"--seed_everything={seed}", f"--trainer.default_root_dir={WORK / 'ptft'}"]


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def timed_train(trainer: Any, samples: int) -> dict:
    """Trains an HF trainer: ``{"seconds", "samples"}`` of training."""
    from recipe_parity import hf_train

    return {"seconds": hf_train(trainer), "samples": samples}


# --- qa: extractive question answering ------------------------------------------------------------------------------
def qa_rows(n: int, rng: random.Random, prefix: str) -> list[dict]:
    """Contexts of 10-25 filler words holding "it is <colour>" and another colour word; the question asks the first."""
    rows = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(10, 25))]
        answer, distractor = rng.sample(COLORS, 2)
        at, other = rng.sample(range(len(words)), 2)
        words[other] = distractor
        words[at:at + 1] = ["it", "is", answer]
        start = len(" ".join(words[:at + 2])) + 1
        rows.append({"id": f"{prefix}{i}", "question": "what color is it ?", "context": " ".join(words),
                     "answers": {"text": [answer], "answer_start": [start]}})
    return rows


def qa_files() -> tuple[str, str]:
    rng = random.Random(DATA_SEED)
    train, val = qa_rows(QA_TRAIN, rng, "train-"), qa_rows(QA_VAL, rng, "val-")
    return write_jsonl("qa-train.jsonl", train), write_jsonl("qa-val.jsonl", val)


def qa_ptft(seed: int, extra: list[str]) -> dict:
    """squad.yaml, with the shared learning rate."""
    from recipe_parity import model_dir, ptft_fit

    return ptft_fit([*recipe_args("text/squad.yaml", model_dir(), seed, *qa_files()),
                     f"--model.init_args.optimizer.lr={QA_LR}", *extra], "val/exact_match", QA_EPOCHS)


def qa_features(tokenizer: Any, rows: list[dict]) -> dict[str, list]:
    """``run_qa``'s features (question first, context truncated to 384 tokens), one window per question."""
    enc = tokenizer([r["question"] for r in rows], [r["context"] for r in rows], truncation="only_second",
                    max_length=384, return_offsets_mapping=True)
    starts, ends, offsets = [], [], []
    for i, row in enumerate(rows):
        context = [o if s == 1 else None for o, s in zip(enc["offset_mapping"][i], enc.sequence_ids(i))]
        first = row["answers"]["answer_start"][0]
        last = first + len(row["answers"]["text"][0])
        starts.append(next(k for k, o in enumerate(context) if o and o[0] <= first < o[1]))
        ends.append(next(k for k, o in enumerate(context) if o and o[0] < last <= o[1]))
        offsets.append(context)
    return {"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
            "attention_mask": enc["attention_mask"], "start_positions": starts, "end_positions": ends,
            "offsets": offsets}


def best_span(start: Any, end: Any, offsets: list, max_tokens: int = QA_MAX_ANSWER_TOKENS) -> tuple[int, int]:
    """Character span of the best answer: the highest start + end logit over all spans of the context of at most
    ``max_tokens`` tokens (``run_qa`` searches the 20 best starts and ends: the same answer unless it lies outside)."""
    import numpy as np

    inside = np.array([o is not None for o in offsets])
    n = len(offsets)
    scores = start[:n, None] + end[None, :n]
    allowed = np.triu(np.ones((n, n), dtype=bool)) & ~np.triu(np.ones((n, n), dtype=bool), max_tokens)
    allowed &= inside[:, None] & inside[None, :]
    s, e = np.unravel_index(np.where(allowed, scores, -np.inf).argmax(), scores.shape)
    return offsets[s][0], offsets[e][1]


def qa_ref(seed: int) -> dict:
    """``run_qa.py`` with its defaults, except dynamic padding; exact match as SQuAD scores it (torchmetrics)."""
    import datasets
    from torchmetrics.text import SQuAD
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, Trainer, set_seed

    from recipe_parity import hf_args, model_dir

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    train_rows, val_rows = (read_jsonl(path) for path in qa_files())
    train = datasets.Dataset.from_dict(qa_features(tokenizer, train_rows)).remove_columns("offsets")
    val = qa_features(tokenizer, val_rows)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir())
    trainer = Trainer(model=model, args=hf_args(seed, QA_EPOCHS, learning_rate=QA_LR), train_dataset=train,
                      processing_class=tokenizer)
    result = timed_train(trainer, len(train) * QA_EPOCHS)
    inputs = {k: val[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    start_logits, end_logits = trainer.predict(datasets.Dataset.from_dict(inputs)).predictions
    preds, target = [], []
    for i, row in enumerate(val_rows):
        s, e = best_span(start_logits[i], end_logits[i], val["offsets"][i])
        preds.append({"prediction_text": row["context"][s:e], "id": row["id"]})
        target.append({"answers": row["answers"], "id": row["id"]})
    return {**result, "metric": SQuAD()(preds, target)["exact_match"].item()}


# --- seq2seq: a tiny random T5 -----------------------------------------------------------------------------------
def s2s_rows(n: int, rng: random.Random) -> list[dict]:
    """4-9 number words in random order -> their translations in the numbers' order."""
    order = list(DICTIONARY)
    rows = []
    for _ in range(n):
        words = rng.sample(order, rng.randint(4, 9))
        rows.append({"source": " ".join(words),
                     "target": " ".join(DICTIONARY[w] for w in sorted(words, key=order.index))})
    return rows


def s2s_files() -> tuple[str, str]:
    rng = random.Random(DATA_SEED)
    train, val = s2s_rows(S2S_TRAIN, rng), s2s_rows(S2S_VAL, rng)
    return write_jsonl("seq2seq-train.jsonl", train), write_jsonl("seq2seq-val.jsonl", val)


def build_t5() -> tuple[Any, Any]:
    """A 2-layer T5 (d_model 64) and a word-level tokenizer with T5's specials (<pad> 0, </s> 1 appended, <unk> 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = [*DICTIONARY, *DICTIONARY.values(), *S2S_PREFIX.replace(":", " :").split()]
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config), tokenizer


def s2s_ptft(seed: int, extra: list[str]) -> dict:
    """translation.yaml on local files, validating at the end of the epoch only (``TrainTimer`` times no mid-epoch
    validation)."""
    from recipe_parity import ptft_fit

    args = recipe_args("text/translation.yaml", saved_model("t5-tiny", build_t5), seed, *s2s_files())
    return ptft_fit([*args, "--data.init_args.dataset=null", "--data.init_args.source_column=source",
                     "--data.init_args.target_column=target", f"--model.init_args.optimizer.lr={S2S_LR}",
                     "--trainer.val_check_interval=1.0", *extra], "val/bleu", S2S_EPOCHS)


def s2s_args(seed: int) -> Any:
    """``recipe_parity.hf_args`` as Seq2SeqTrainingArguments, generating at prediction, with the lr override."""
    from transformers import Seq2SeqTrainingArguments

    from recipe_parity import WORK

    return Seq2SeqTrainingArguments(output_dir=str(WORK / "hf"), per_device_train_batch_size=BATCH,
                                    per_device_eval_batch_size=EVAL_BATCH, num_train_epochs=S2S_EPOCHS, seed=seed,
                                    learning_rate=S2S_LR, predict_with_generate=True, report_to=[],
                                    save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
                                    use_cpu=True)


def s2s_ref(seed: int) -> dict:
    """``run_translation.py`` with its defaults (source prefix, lengths and beam search as the recipe's)."""
    import datasets
    import numpy as np
    from torchmetrics.text import SacreBLEUScore
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer, set_seed

    set_seed(seed)
    folder = saved_model("t5-tiny", build_t5)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train_rows, val_rows = (read_jsonl(path) for path in s2s_files())

    def build(rows: list[dict]) -> Any:
        enc = tokenizer([S2S_PREFIX + r["source"] for r in rows], truncation=True, max_length=S2S_MAX_LENGTH)
        targets = tokenizer(text_target=[r["target"] for r in rows], truncation=True, max_length=S2S_MAX_LENGTH)
        return datasets.Dataset.from_dict({**enc, "labels": targets["input_ids"]})

    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    trainer = Seq2SeqTrainer(model=model, args=s2s_args(seed), train_dataset=build(train_rows),
                             processing_class=tokenizer, data_collator=DataCollatorForSeq2Seq(tokenizer, model=model))
    result = timed_train(trainer, len(train_rows) * S2S_EPOCHS)
    out = trainer.predict(build(val_rows), num_beams=S2S_BEAMS, max_new_tokens=S2S_MAX_NEW_TOKENS,
                          length_penalty=S2S_LENGTH_PENALTY)
    ids = np.where(out.predictions < 0, tokenizer.pad_token_id, out.predictions)
    generated_text = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    bleu = SacreBLEUScore()(generated_text, [[r["target"]] for r in val_rows])  # ptft's metric for val/bleu
    return {**result, "metric": bleu.item()}


# --- sft: a tiny random Llama ------------------------------------------------------------------------------------
def sft_chain() -> dict[tuple[str, str], tuple[list[str], list[float]]]:
    """A second-order Markov chain over ``SFT_WORDS``: each pair of words is followed by one of two words, 0.8 / 0.2."""
    rng = random.Random(DATA_SEED)
    return {(a, b): (rng.sample(SFT_WORDS, 2), [0.8, 0.2]) for a in SFT_WORDS for b in SFT_WORDS}


def sft_rows(n: int, rng: random.Random) -> list[dict]:
    """Chats: "continue : w1 w2 w3 w4" -> the next 6 words of the chain (the prompt also follows the chain)."""
    chain, rows = sft_chain(), []
    for _ in range(n):
        words = rng.sample(SFT_WORDS, 2)
        while len(words) < 4 + SFT_REPLY_WORDS:
            words += rng.choices(*chain[words[-2], words[-1]])
        rows.append({"messages": [{"role": "user", "content": "continue : " + " ".join(words[:4])},
                                  {"role": "assistant", "content": " ".join(words[4:])}]})
    return rows


def sft_files() -> tuple[str, str]:
    rng = random.Random(DATA_SEED)
    train, val = sft_rows(SFT_TRAIN, rng), sft_rows(SFT_VAL, rng)
    return write_jsonl("sft-train.jsonl", train), write_jsonl("sft-val.jsonl", val)


def build_llama() -> tuple[Any, Any]:
    """A 2-layer Llama (hidden 64) and a word-level tokenizer with ``SFT_TEMPLATE`` as its chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "</s>", "user", "assistant", "system", ":", "continue", *SFT_WORDS]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    tokenizer.chat_template = SFT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=True,
                         initializer_range=0.2,  # 0.02 plateaus this small a model for hundreds of steps
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config), tokenizer


def sft_ptft(seed: int, extra: list[str]) -> dict:
    """sft.yaml on the generated chats."""
    from recipe_parity import ptft_fit

    args = recipe_args("text/sft.yaml", saved_model("llama-tiny", build_llama), seed, *sft_files())
    return ptft_fit([*args, f"--model.init_args.optimizer.lr={SFT_LR}", *extra], "val/loss", SFT_EPOCHS)


def sft_features(tokenizer: Any, rows: list[dict]) -> Any:
    """Each chat rendered with the template; labels are the reply tokens (and its </s>), -100 on the prompt."""
    import datasets

    features: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True)["input_ids"]
        ids = tokenizer.apply_chat_template(row["messages"])["input_ids"]
        assert ids[:len(prompt)] == prompt
        features["input_ids"].append(ids)
        features["attention_mask"].append([1] * len(ids))
        features["labels"].append([-100] * len(prompt) + ids[len(prompt):])
    return datasets.Dataset.from_dict(features)


def token_mean_loss(model: Any, dataset: Any, collator: Any) -> float:
    """Negative log-likelihood per labelled token (next-token prediction) over the whole dataset."""
    import torch
    import torch.nn.functional as F

    total, tokens = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(dataset), EVAL_BATCH):
            batch = collator([dataset[k] for k in range(i, min(i + EVAL_BATCH, len(dataset)))])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum").item()
            tokens += int((labels != -100).sum())
    return total / tokens


def sft_ref(seed: int) -> dict:
    """Plain HF Trainer SFT at TrainingArguments' defaults (no TRL): the loss on the reply tokens only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, set_seed

    from recipe_parity import hf_args

    set_seed(seed)
    folder = saved_model("llama-tiny", build_llama)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train, val = (sft_features(tokenizer, read_jsonl(path)) for path in sft_files())
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")  # pads labels too
    model = AutoModelForCausalLM.from_pretrained(folder)
    trainer = Trainer(model=model, args=hf_args(seed, SFT_EPOCHS, learning_rate=SFT_LR), train_dataset=train,
                      processing_class=tokenizer, data_collator=collator)
    result = timed_train(trainer, len(train) * SFT_EPOCHS)
    return {**result, "metric": token_mean_loss(model, val, collator)}


RUNNERS = {"qa": (qa_ptft, qa_ref), "seq2seq": (s2s_ptft, s2s_ref), "sft": (sft_ptft, sft_ref)}
