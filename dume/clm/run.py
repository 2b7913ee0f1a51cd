"""The causal-LM experiment's run directory and its shared steps.

A run directory holds what one Table 2 reproduction produces (thin scripts call these helpers and write here):

    tokenizer/                 the BPE tokenizer (Hugging Face format)
    seed/                      the pretrained seed Llama (save_pretrained, safetensors)
    experts/<domain>/          one dense Llama expert per domain
    models/<strategy>/         merged / MoErged checkpoints
    results/*.json             one JSON per script: what it measured and with which settings
    clm_results.json, table.md the assembled table
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from dume.checkpoint.io import atomic_write_json, is_complete_checkpoint, read_json
from dume.corpora import documents as data
from dume.errors import DumeError
from dume.runtime.environment import environment

# Validation during training only ranks checkpoints: MAX_VALIDATION_BLOCKS evenly spaced windows out of the
# split's first VALIDATION_POOL (the whole split on the embedded default).
MAX_VALIDATION_BLOCKS = 128
VALIDATION_POOL = 2048
HUB_TEST_WINDOWS = 4000 * 16  # paper scale: the original code's first 4000 test batches of 16 windows
# The paper's tokenizer (the original code pre-tokenized with Meta-Llama-3-8B's; the Llama-3.x tokenizers share
# its 128 000 BPE tokens). Gated: see datasets_setup.md.
HUB_TOKENIZER = "meta-llama/Meta-Llama-3-8B"
# The BPE trains on at most this much text: a 4096-token vocabulary settles long before; more would only cost.
TOKENIZER_TRAINING_CHARS = 10_000_000
RECIPE_CHOICES = ("auto", "original", "embedded")


@dataclass
class Run:
    run_dir: Path
    source: str = "offline"
    data_dir: str | None = None
    seq_len: int = 256
    tokenizer_name: str | None = None
    vocab_size: int = 4096
    max_eval_blocks: int | None = None
    recipe: str = "auto"
    device: str = "cpu"              # where evaluation and statistics run (`--device`, resolved)
    _tokenizer: object = field(default=None, repr=False)
    _blocks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_args(cls, args) -> "Run":
        from dume.runtime.devices import check_device, resolve_device

        run = cls(Path(args.run_dir), args.source, args.data_dir, args.seq_len, args.tokenizer,
                  args.vocab_size, getattr(args, "max_eval_blocks", None), getattr(args, "recipe", "auto"),
                  resolve_device(check_device(getattr(args, "device", "auto"))))
        if run.run_dir.exists() and not run.run_dir.is_dir():
            raise DumeError(f"--run-dir {run.run_dir} is a file; give a folder (it is created if missing)")
        if run.seq_len < 2:
            raise DumeError("--seq-len must be at least 2")
        if run.recipe not in RECIPE_CHOICES:
            raise DumeError(f"--recipe must be one of {RECIPE_CHOICES}, got {run.recipe!r}")
        if run.max_eval_blocks is not None and run.max_eval_blocks < 1:
            raise DumeError("--max-eval-blocks must be at least 1")
        if run.tokenizer_name and (run.run_dir / "tokenizer").is_dir():
            run.tokenizer  # a tokenizer that differs from the run's is refused before any work
        return run

    @property
    def paper_source(self) -> bool:
        """The paper's corpora (`Source.paper_defaults`): its recipe, tokenizer and test windows by default."""
        return data.source_of(self.source).paper_defaults

    @property
    def recipe_name(self) -> str:
        """'original' (the original code's recipe) on the paper's corpora, else 'embedded'; --recipe overrides."""
        if self.recipe != "auto":
            return self.recipe
        return "original" if self.paper_source else "embedded"

    @property
    def window_recipe(self):
        from dume.clm.tokens import get_recipe

        return get_recipe("original" if self.recipe_name == "original" else "eos")

    @property
    def eval_windows(self) -> int | None:
        """Test windows per domain: --max-eval-blocks, else the original's 64 000 on the hub, else all."""
        if self.max_eval_blocks:
            return self.max_eval_blocks
        return HUB_TEST_WINDOWS if self.paper_source else None

    @property
    def seed_dir(self) -> Path:
        return self.run_dir / "seed"

    def expert_dir(self, domain: str) -> Path:
        return self.run_dir / "experts" / domain

    def model_dir(self, name: str) -> Path:
        return self.run_dir / "models" / name

    def result_path(self, name: str) -> Path:
        return self.run_dir / "results" / f"{name}.json"

    def domains(self) -> list[str]:
        return list(data.available_domains(self.source, self.data_dir))

    def select_domains(self, spec: str) -> list[str]:
        """'all' or a comma-separated list, every name checked before any work."""
        domains = self.domains() if spec == "all" else [d.strip() for d in spec.split(",") if d.strip()]
        for d in domains:
            self.check_domain(d)
        return domains

    def pending_path(self, name: str) -> Path:
        return self.run_dir / "results" / f".{name}.pending"

    def done(self, name: str, redo: bool, inputs: Mapping[str, Path] | None = None,
             models: Mapping[str, Path] | None = None) -> bool:
        """True (and says so) when result `name` exists and still belongs to its inputs and model, unless `redo`.

        A result records the content fingerprints (`dume.checkpoint.fingerprint`) of the checkpoints it was
        computed from (`inputs`, e.g. the experts) and of the model it evaluated (`models`). It is recomputed,
        saying why, when any of them (or its text) changed or is gone, when it predates fingerprints, or when an
        earlier run was interrupted (a `--redo` killed halfway leaves the old result and model; a rerun finishes).
        """
        path = self.result_path(name)
        if redo:
            return False
        if self.pending_path(name).is_file():
            print(f"an earlier run of {name} was interrupted; finishing it")
            return False
        if not path.is_file():
            return False
        why = self._stale_because(path, inputs or {}, models or {})
        if why:
            print(f"{path}: {why}; recomputing")
            return False
        print(f"{path} exists; skipping (--redo to recompute)")
        return True

    def _stale_because(self, path: Path, inputs: Mapping[str, Path], models: Mapping[str, Path]) -> str | None:
        from dume.checkpoint.fingerprint import stale_because

        try:
            result = read_json(path)
            stored = result.get("fingerprints")
        except (DumeError, AttributeError):
            return "unreadable"
        changed = self.corpus_changed(result.get("corpus"))
        if changed:
            return changed
        if not inputs and not models:
            return None
        if not isinstance(stored, dict):
            return "it records no fingerprints of what it was computed from (older run)"
        return stale_because({label: (dep, (stored.get(kind) or {}).get(label))
                              for kind, deps in (("inputs", inputs), ("models", models)) for label, dep in deps.items()})

    def corpus_stamps(self, domains) -> dict[str, dict]:
        """{domain: `data.corpus_stamp`} (files, sizes, mtimes), kept with a result to notice a changed corpus."""
        return {d: data.corpus_stamp(d, self.source, self.data_dir) for d in domains}

    def corpus_changed(self, recorded: dict | None) -> str | None:
        """Why a result's text has changed since it was computed, or None (also for results older than stamps)."""
        if not isinstance(recorded, dict):
            return None
        for domain, then in recorded.items():
            try:
                now = data.corpus_stamp(domain, self.source, self.data_dir)
            except DumeError as e:
                return f"the text of domain {domain!r} cannot be read now ({e})"
            if now != then:
                return f"the text of domain {domain!r} changed since ({_stamp_difference(then, now)})"
        return None

    def begin(self, name: str, inputs: Mapping[str, Path] | None = None) -> dict[str, str]:
        """Mark result `name` as being computed and return its inputs' fingerprints (taken
        now, before the work, so the result records what it was really computed from)."""
        from dume.checkpoint.fingerprint import fingerprint

        fps = {label: fingerprint(dep) for label, dep in (inputs or {}).items()}
        atomic_write_json(self.pending_path(name), {"inputs": fps})
        return fps

    def check_domain(self, domain: str) -> None:
        valid = self.domains()
        if domain not in valid:
            raise DumeError(f"unknown domain {domain!r} for source {self.source!r}: choose from {valid}")

    @property
    def tokenizer(self):
        """The run's tokenizer, kept in RUN_DIR/tokenizer by the first script (pretraining) as `--tokenizer` says;
        every later script uses that copy and refuses a `--tokenizer` with another vocabulary before any work."""
        if self._tokenizer is None:
            from dume.runtime.distributed import main_process_first
            from dume.text.tokenizer import load_tokenizer, save_run_tokenizer, train_bpe_tokenizer, vocab_fingerprint

            path = self.run_dir / "tokenizer"
            with main_process_first():
                if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
                    tok = load_tokenizer(path)
                    if self.tokenizer_name and self.tokenizer_name != "bpe":
                        given = load_tokenizer(self.tokenizer_name)
                        if vocab_fingerprint(given) != vocab_fingerprint(tok):
                            raise DumeError(
                                f"--tokenizer {self.tokenizer_name} has a different vocabulary than this run's "
                                f"tokenizer ({path}, {len(given)} vs {len(tok)} tokens, fingerprint "
                                f"{vocab_fingerprint(given)} != {vocab_fingerprint(tok)}): its models were trained "
                                "with the run's; leave out --tokenizer or use another --run-dir")
                else:
                    name = self.tokenizer_name or (HUB_TOKENIZER if self.paper_source else "bpe")
                    if name == "bpe":
                        tok = train_bpe_tokenizer(self._tokenizer_training_texts(), self.vocab_size)
                    else:
                        tok = load_tokenizer(name)
                    save_run_tokenizer(tok, path, made_from=name)
                    tok = load_tokenizer(path)
            self._tokenizer = tok
        return self._tokenizer

    def _tokenizer_training_texts(self):
        """The first TOKENIZER_TRAINING_CHARS of the pretraining corpus (all of it here)."""
        docs, _ = data.iter_documents("pretrain", "train", self.source, data_dir=self.data_dir)
        total = 0
        for doc in docs:
            yield doc
            total += len(doc)
            if total >= TOKENIZER_TRAINING_CHARS:
                break

    def windows(self, domain: str, split: str, max_windows: int | None = None):
        """`domain`'s `split` as lazy `TokenWindows` from a cached token file (>= `max_windows`; None: all)."""
        from dume.clm.tokens import TokenWindows, prepare_tokens, tokens_needed

        recipe = self.window_recipe
        corpus = {"source": self.source, "domain": domain, "split": split,
                  **data.corpus_stamp(domain, self.source, self.data_dir)}
        need = tokens_needed(max_windows, self.seq_len, recipe) if max_windows else None
        tok = self.tokenizer
        tf = prepare_tokens(lambda: data.iter_documents(domain, split, self.source, data_dir=self.data_dir)[0],
                            tok, recipe, corpus, need, desc=f"tokenize {domain}/{split}")
        if tf.n_tokens == 0:
            raise DumeError(f"domain {domain!r} split {split!r} has no tokens to train or evaluate on")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return TokenWindows(tf.tokens(), self.seq_len, recipe, max_windows, pad_id=pad or 0)

    def blocks(self, domain: str, split: str, max_windows: int | None = None):
        """Validation and test: (input_ids, attention_mask) tensors, bounded (see MAX_VALIDATION_BLOCKS,
        `eval_windows`). Train: the lazy windows, `max_windows` of them."""
        if split == "train":
            return self.windows(domain, split, max_windows)
        key = (domain, split)
        if key not in self._blocks:
            if split == "validation":
                w = self.windows(domain, split, VALIDATION_POOL)
                pick = None
                if len(w) > MAX_VALIDATION_BLOCKS:
                    pick = torch.linspace(0, len(w) - 1, MAX_VALIDATION_BLOCKS).long().tolist()
                self._blocks[key] = w.tensors(pick)
            else:
                self._blocks[key] = self.windows(domain, split, self.eval_windows).tensors()
        return self._blocks[key]

    def require_checkpoint(self, path: Path, made_by: str) -> Path:
        if not is_complete_checkpoint(path):
            raise DumeError(f"missing checkpoint {path}: run {made_by} first")
        return path

    def check_checkpoint(self, path: Path, made_by: str) -> Path:
        """Complete, readable (headers parse), embedding the run's tokenizer: checked before any heavy work."""
        from dume.checkpoint.reader import CheckpointReader, load_config
        from dume.train.models import check_tokenizer_matches

        self.require_checkpoint(path, made_by)
        with CheckpointReader(path):
            pass
        config = load_config(path, model_type=read_json(path / "config.json").get("model_type", "llama"))
        check_tokenizer_matches(config, self.tokenizer, where=str(path))
        return path

    def tokenizer_fingerprint(self) -> str:
        from dume.text.tokenizer import vocab_fingerprint

        return vocab_fingerprint(self.tokenizer)

    def load(self, path: Path, made_by: str):
        from dume.train.models import check_tokenizer_matches, load_model

        model = load_model(self.require_checkpoint(path, made_by))
        check_tokenizer_matches(model.config, self.tokenizer, where=str(path))
        return model

    def evaluate(self, model, domains: list[str], batch_size: int = 32, label: str = "") -> dict:
        """Test perplexity of `model` on each domain, on the run's device (`--device`; the model is moved there
        once, in float32: perplexities are compared across rows to a few digits, which bf16 logits would blur)."""
        from dume.train.perplexity import perplexity

        model = self.on_device(model)
        out = {}
        for d in domains:
            ids, mask = self.blocks(d, "test")
            out[d] = perplexity(model, ids, mask, batch_size, desc=f"eval {label} on {d}")
            if not math.isfinite(out[d]["loss"]) or not math.isfinite(out[d]["perplexity"]):
                raise DumeError(f"{label or 'model'}: non-finite perplexity on domain {d} (mean loss {out[d]['loss']}); "
                                "its weights or its router are broken, nothing was written")
        return out

    def on_device(self, model):
        """`model` on the run's device (a no-op when it is there already)."""
        if next(model.parameters()).device != torch.device(self.device):
            model = model.to(self.device)
        return model

    def settings(self) -> dict:
        return {"source": self.source, "data_dir": self.data_dir, "seq_len": self.seq_len,
                "tokenizer": str(self.run_dir / "tokenizer"), "recipe": self.recipe_name,
                "window_recipe": self.window_recipe.description, "eval_windows": self.eval_windows}


def _stamp_difference(then, now) -> str:
    if not isinstance(then, dict) or not isinstance(now, dict):
        return "another corpus"
    if then.get("files") is not None and now.get("files") is not None:
        old = {f[0]: f[1:] for f in then["files"]}
        new = {f[0]: f[1:] for f in now["files"]}
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if diff:
            return "files changed: " + ", ".join(diff[:3]) + (" ..." if len(diff) > 3 else "")
    keys = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
    return "changed: " + ", ".join(keys)


def result_domains(run: Run, payload: dict) -> list[str]:
    """The domains a result's text came from: its `domains`, its `domain`, or the domain keys of its `results`."""
    named = payload.get("domains") or ([payload["domain"]] if isinstance(payload.get("domain"), str) else [])
    if not named and isinstance(payload.get("results"), dict):
        known = set(run.domains())
        named = [d for d in payload["results"] if d in known]
    return list(named)


def write_result(run: Run, name: str, payload: dict, inputs: Mapping[str, str] | None = None,
                 models: Mapping[str, Path] | None = None) -> Path:
    """Write result `name` (strict JSON), recording the fingerprints of its inputs (as
    `Run.begin` returned them) and of the models it evaluated, then clear its pending mark."""
    from dume.checkpoint.fingerprint import fingerprint

    payload = {**payload, "settings": {**run.settings(), **payload.get("settings", {})}, "environment": environment(),
               "corpus": run.corpus_stamps(result_domains(run, payload))}
    if inputs is not None or models is not None:
        payload["fingerprints"] = {"inputs": dict(inputs or {}),
                                   "models": {label: fingerprint(p) for label, p in (models or {}).items()}}
    out = atomic_write_json(run.result_path(name), payload)
    run.pending_path(name).unlink(missing_ok=True)
    return out


def read_result(run: Run, name: str, made_by: str) -> dict:
    path = run.result_path(name)
    if not path.is_file():
        raise DumeError(f"missing {path}: run {made_by} first")
    return read_json(path)

