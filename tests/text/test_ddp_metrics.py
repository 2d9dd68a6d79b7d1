"""Epoch metrics of the text tasks on 2 processes (gloo, ``ddp_spawn``) equal those of 1 process on the same data.

Every validation set holds a multiple of 2 x the evaluation batch size, so DistributedSampler pads nothing (it would
otherwise repeat examples on the last round and the 2-process score would count them twice). NER, QA and seq2seq
evaluate one example per batch: their ``val/loss`` is a mean of per-batch means, which depends on how examples are
grouped into batches; LM and SFT weight their loss by tokens, so any grouping gives the same value.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import FILLER, minilm_dir
from helpers import trainer

from ptft.text import (
    ChatDataModule,
    ChatFineTuner,
    LanguageModel,
    LanguageModelingDataModule,
    QuestionAnswerer,
    QuestionAnsweringDataModule,
    Seq2SeqDataModule,
    Seq2SeqGenerator,
    TokenClassificationDataModule,
    TokenClassifier,
)

PEOPLE, PLACES = ["alice", "maria", "john", "peter"], ["paris", "berlin", "tokyo", "lima"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sentences(n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(FILLER + COLORS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def decoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny random GPT-2 and T5 folders (2 layers, hidden 32) sharing MiniLM's word-piece tokenizer."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_dir())
    vocab, folders = len(tokenizer), {}
    torch.manual_seed(0)
    models = {
        "gpt2": tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                                 eos_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id)),
        "t5": tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                                        num_heads=2, pad_token_id=0, decoder_start_token_id=0,
                                                        eos_token_id=tokenizer.sep_token_id)),
    }
    for name, model in models.items():
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = str(folder)
    return folders


def ner_case(tiny_bert: str, tmp_path: Path):
    rng = random.Random(0)
    rows = []
    for _ in range(8):
        words, tags = [], []
        for _ in range(rng.randint(2, 4)):
            if rng.random() < 0.5:
                words += [rng.choice(PEOPLE), "said"]
                tags += ["B-PER", "O"]
            else:
                words += ["in", rng.choice(PLACES)]
                tags += ["O", "B-LOC"]
        rows.append({"tokens": words, "ner_tags": tags})
    labels = ["O", "B-PER", "B-LOC"]
    torch.manual_seed(1)
    model = TokenClassifier(tiny_bert, num_labels=3, label_names=labels)
    data = TokenClassificationDataModule(val_file=write_jsonl(tmp_path / "ner.jsonl", rows), labels=labels,
                                         batch_size=1)
    return model, data


def qa_case(tiny_bert: str, tmp_path: Path):
    rng = random.Random(0)
    rows = []
    for i in range(8):
        words = [rng.choice(FILLER) for _ in range(rng.randint(10, 30))]
        at = rng.randrange(len(words))
        words[at] = answer = rng.choice(COLORS)
        start = len(" ".join(words[:at])) + (at > 0)
        rows.append({"id": str(i), "question": "what color is it ?", "context": " ".join(words),
                     "answers": {"text": [answer], "answer_start": [start]}})
    torch.manual_seed(1)
    model = QuestionAnswerer(tiny_bert, max_answer_length=3)
    data = QuestionAnsweringDataModule(val_file=write_jsonl(tmp_path / "qa.jsonl", rows), max_length=32,
                                       doc_stride=8, batch_size=1)
    return model, data


def seq2seq_case(t5: str, tmp_path: Path):
    rng = random.Random(0)
    rows = [{"source": s, "target": " ".join(reversed(s.split()))} for s in sentences(8, rng)]
    model = Seq2SeqGenerator(t5, max_new_tokens=8)
    data = Seq2SeqDataModule(val_file=write_jsonl(tmp_path / "pairs.jsonl", rows), batch_size=1)
    return model, data


def lm_case(tiny_bert: str, tmp_path: Path):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(sentences(8, random.Random(0))) + "\n")
    torch.manual_seed(1)  # the checkpoint has no MLM head transform: it is initialised at random
    model = LanguageModel(tiny_bert, objective="mlm")
    # line by line: 8 rows of different lengths, so batches hold different numbers of tokens
    data = LanguageModelingDataModule(val_file=str(path), line_by_line=True, block_size=32, batch_size=2,
                                      mlm_probability=0.3)
    return model, data


def sft_case(gpt2: str, tmp_path: Path):
    rng = random.Random(0)
    rows = [{"prompt": p, "response": r} for p, r in zip(sentences(8, rng), sentences(8, rng))]
    model = ChatFineTuner(gpt2, num_samples=0)
    data = ChatDataModule(val_file=write_jsonl(tmp_path / "chat.jsonl", rows), prompt_column="prompt", batch_size=2)
    return model, data


def validate(model, data, tmp_path: Path, **kwargs) -> dict[str, float]:
    data.connect(model)
    results = trainer(tmp_path, **kwargs).validate(model, data, verbose=False)[0]
    return {k: float(v) for k, v in results.items()}


#: Lightning's ddp_spawn machinery with the fork start method: the same launcher, gloo process group and
#: DistributedSampler as ddp_spawn, but the workers inherit the loaded modules. With spawn each worker re-imports torch,
#: Lightning and transformers: measured 80 s for one case on the shared 2-core machine, against 4 s with fork.
STRATEGY = "ddp_fork"
CASES = {"ner": ner_case, "qa": qa_case, "seq2seq": seq2seq_case, "lm": lm_case, "sft": sft_case}
#: Metrics that must come out above zero on one process, so that agreement is not 0 == 0.
NONZERO = {"ner": "val/f1", "qa": "val/f1", "seq2seq": "val/chrf", "lm": "val/perplexity", "sft": "val/perplexity"}


@pytest.mark.parametrize("task", list(CASES))
def test_two_processes_log_the_epoch_metrics_of_one(task, tiny_bert, decoders, tmp_path):
    name = {"seq2seq": decoders["t5"], "sft": decoders["gpt2"]}.get(task, tiny_bert)
    model, data = CASES[task](name, tmp_path)
    single = validate(model, data, tmp_path)
    model, data = CASES[task](name, tmp_path)  # fresh: nothing of the first run carried over
    ddp = validate(model, data, tmp_path, devices=2, strategy=STRATEGY)
    assert single[NONZERO[task]] > 0, single
    assert set(ddp) == set(single)
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, ddp, single)
