"""The causal-LM experiment's run directory and its shared steps.

A run directory holds everything one Table 2 reproduction produces:

    tokenizer/                 the BPE tokenizer (Hugging Face format)
    seed/                      the pretrained seed Llama (save_pretrained, safetensors)
    experts/<domain>/          one dense Llama expert per domain
    models/<strategy>/         merged / MoErged checkpoints
    results/*.json             one JSON per script: what it measured and with which settings
    clm_results.json, table.md the assembled table

Scripts are thin: they parse flags, call these helpers, and write JSON here.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from . import data
from .errors import DumeError
from .io import atomic_write_json, is_complete_checkpoint, read_json


MAX_VALIDATION_BLOCKS = 128


@dataclass
class Run:
    run_dir: Path
    source: str = "offline"
    data_dir: str | None = None
    seq_len: int = 256
    tokenizer_name: str | None = None
    vocab_size: int = 4096
    max_eval_blocks: int | None = None
    _tokenizer: object = field(default=None, repr=False)
    _blocks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_args(cls, args) -> "Run":
        run = cls(Path(args.run_dir), args.source, args.data_dir, args.seq_len, args.tokenizer,
                  args.vocab_size, getattr(args, "max_eval_blocks", None))
        if run.seq_len < 2:
            raise DumeError("--seq-len must be at least 2")
        return run

    # ---- places -------------------------------------------------------------------
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
        """True (and says so) when result `name` exists, still belongs to its inputs and its
        model, and the user did not ask to redo it.

        A result records the content fingerprints (`dume.fingerprint`) of the checkpoints it
        was computed from (`inputs`, e.g. the experts) and of the model it evaluated
        (`models`). It is recomputed, with one line saying why, when any of them changed or
        is gone, when it predates fingerprints, or when an earlier run of it was interrupted
        (a `--redo` killed halfway leaves the previous result and model in place; the next
        plain run finishes the job).
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
        from .fingerprint import fingerprint

        try:
            stored = read_json(path).get("fingerprints")
        except (DumeError, AttributeError):
            return "unreadable"
        if not inputs and not models:
            return None
        if not isinstance(stored, dict):
            return "it records no fingerprints of what it was computed from (older run)"
        for kind, deps in (("inputs", inputs), ("models", models)):
            for label, dep in deps.items():
                if not is_complete_checkpoint(dep):
                    return f"its {label} {dep} is missing"
                now, then = fingerprint(dep), (stored.get(kind) or {}).get(label)
                if now != then:
                    return f"it was computed from another {label} (fingerprint {then} != {now} now)"
        return None

    def begin(self, name: str, inputs: Mapping[str, Path] | None = None) -> dict[str, str]:
        """Mark result `name` as being computed and return its inputs' fingerprints (taken
        now, before the work, so the result records what it was really computed from)."""
        from .fingerprint import fingerprint

        fps = {label: fingerprint(dep) for label, dep in (inputs or {}).items()}
        atomic_write_json(self.pending_path(name), {"inputs": fps})
        return fps

    def check_domain(self, domain: str) -> None:
        valid = self.domains()
        if domain not in valid:
            raise DumeError(f"unknown domain {domain!r} for source {self.source!r}: choose from {valid}")

    # ---- tokenizer and data ---------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import get_or_train_tokenizer

            self._tokenizer = get_or_train_tokenizer(
                self.run_dir, lambda: data.load_documents("pretrain", "train", self.source, data_dir=self.data_dir),
                self.vocab_size, self.tokenizer_name)
        return self._tokenizer

    def blocks(self, domain: str, split: str):
        """(input_ids, attention_mask) of `domain`'s `split`, packed into seq_len blocks."""
        key = (domain, split)
        if key not in self._blocks:
            docs = data.load_documents(domain, split, self.source, data_dir=self.data_dir)
            ids, mask = data.pack_documents(docs, self.tokenizer, self.seq_len)
            if split == "test" and self.max_eval_blocks:
                ids, mask = ids[: self.max_eval_blocks], mask[: self.max_eval_blocks]
            if split == "validation" and len(ids) > MAX_VALIDATION_BLOCKS:
                # Validation during training only has to rank checkpoints; a fixed
                # deterministic sample keeps it cheap on a large corpus.
                pick = torch.linspace(0, len(ids) - 1, MAX_VALIDATION_BLOCKS).long()
                ids, mask = ids[pick], mask[pick]
            self._blocks[key] = (ids, mask)
        return self._blocks[key]

    # ---- checkpoints ------------------------------------------------------------------
    def require_checkpoint(self, path: Path, made_by: str) -> Path:
        if not is_complete_checkpoint(path):
            raise DumeError(f"missing checkpoint {path}: run {made_by} first")
        return path

    def check_checkpoint(self, path: Path, made_by: str) -> Path:
        """Complete, readable (safetensors headers parse) and embeds the run's tokenizer:
        checked for every input before a script does any heavy work."""
        from .checkpoints import CheckpointReader, load_config
        from .models import check_tokenizer_matches

        self.require_checkpoint(path, made_by)
        with CheckpointReader(path):
            pass
        config = load_config(path, model_type=read_json(path / "config.json").get("model_type", "llama"))
        check_tokenizer_matches(config, self.tokenizer, where=str(path))
        return path

    def tokenizer_fingerprint(self) -> str:
        import hashlib

        vocab = sorted(self.tokenizer.get_vocab().items())
        return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]

    def load(self, path: Path, made_by: str):
        from .models import check_tokenizer_matches, load_model

        model = load_model(self.require_checkpoint(path, made_by))
        check_tokenizer_matches(model.config, self.tokenizer, where=str(path))
        return model

    def evaluate(self, model, domains: list[str], batch_size: int = 32, label: str = "") -> dict:
        """Test perplexity of `model` on each domain."""
        from .evaluate import perplexity

        out = {}
        for d in domains:
            ids, mask = self.blocks(d, "test")
            out[d] = perplexity(model, ids, mask, batch_size, desc=f"eval {label} on {d}")
            if not math.isfinite(out[d]["loss"]) or not math.isfinite(out[d]["perplexity"]):
                raise DumeError(f"{label or 'model'}: non-finite perplexity on domain {d} (mean loss {out[d]['loss']}); "
                                "its weights or its router are broken, nothing was written")
        return out

    def settings(self) -> dict:
        return {"source": self.source, "data_dir": self.data_dir, "seq_len": self.seq_len,
                "tokenizer": self.tokenizer_name or str(self.run_dir / "tokenizer")}


def environment() -> dict:
    """Versions and hardware recorded with every result."""
    import accelerate
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}


def write_result(run: Run, name: str, payload: dict, inputs: Mapping[str, str] | None = None,
                 models: Mapping[str, Path] | None = None) -> Path:
    """Write result `name` (strict JSON), recording the fingerprints of its inputs (as
    `Run.begin` returned them) and of the models it evaluated, then clear its pending mark."""
    from .fingerprint import fingerprint

    payload = {**payload, "settings": {**run.settings(), **payload.get("settings", {})}, "environment": environment()}
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

