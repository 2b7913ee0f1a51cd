"""math: GSM8K. Paper protocol: the raw question with BOS, 0-shot, sampled (exact match,
flexible extract); lm-eval protocol: its stock 8-shot greedy task (strict match).
Local files: DATA_DIR/gsm8k/{train,test}.jsonl with {"question", "answer"} (no train: shots come from test)."""

from __future__ import annotations

from dume.errors import DumeError
from dume.reasoning.tasks.base import (PAPER_GENERATION, Task, TaskContext, _split_files, _stock_task_yaml,
                                       hub_records, local_records)

HUB = ("openai/gsm8k", "main")
PAPER_OVERRIDE = f'doc_to_text: "{{{{question}}}}"\nnum_fewshot: 0\ngeneration_kwargs: {PAPER_GENERATION}\n'


def configs(ctx: TaskContext):
    stock = ctx.stock / "gsm8k" / "gsm8k.yaml"
    name = f"dume_{ctx.tag}_gsm8k"
    extra = PAPER_OVERRIDE if ctx.protocol == "paper" else ""
    if ctx.local is None:
        if ctx.protocol == "lm-eval":
            return ctx.spec(["gsm8k"], "hub:openai/gsm8k")
        return ctx.spec([ctx.write(name, _stock_task_yaml(name, stock, None, extra))], "hub:openai/gsm8k")
    files = _split_files(ctx.local / "gsm8k", ("train", "test"))
    if "test" not in files:
        raise DumeError(f"local gsm8k data missing: expected {ctx.local / 'gsm8k' / 'test.jsonl'}")
    notes = []
    if "train" not in files:
        extra += "training_split: null\nfewshot_split: test\n"
        if ctx.num_fewshot:
            notes.append("no local train split: few-shot examples are drawn from test")
    return ctx.spec([ctx.write(name, _stock_task_yaml(name, stock, files, extra))], f"local:{ctx.local / 'gsm8k'}",
                    notes)


def records(data_dir, languages=None):
    return hub_records(HUB) if data_dir is None else local_records(data_dir, "gsm8k", ("train", "test"))


TASK = Task(domain="math", heading="Mathematics",
            metric={"paper": "exact_match,flexible-extract", "lm-eval": "exact_match,strict-match"},
            shots={"paper": 0, "lm-eval": 8}, configs=configs, records=records, prompt_field="question",
            full_text=lambda doc: f"Question: {doc['question']}\nAnswer: {doc['answer']}", hub=HUB)
