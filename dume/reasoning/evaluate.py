"""Evaluating a checkpoint on a reasoning task with lm-eval's own HFLM."""

from __future__ import annotations

import os

from dume.errors import DumeError


def _preflight_hub(spec) -> None:
    """A stock task reads a hub dataset: fail with one line when it cannot be had."""
    if not spec.source.startswith("hub:"):
        return
    import datasets

    from dume.reasoning.tasks import TASKS

    path, name = TASKS[spec.domain].hub
    if spec.domain == "multilingual":
        name = spec.tasks[0].split("_", 1)[1]
    try:
        datasets.load_dataset_builder(path, name)
    except Exception as e:
        raise DumeError(f"task {spec.domain} ({', '.join(spec.tasks[:3])}{'...' if len(spec.tasks) > 3 else ''}) "
                        f"needs the hub dataset {path}, which cannot be reached ({type(e).__name__}); run online "
                        f"once to cache it, or pass --data-dir with local files (docs/reasoning.md)") from None


# HFLM's max_length: the longest prompt either protocol sends (gsm8k 8-shot under lm-eval, about 1,000 Llama-3
# tokens) with room to spare, plus the most any task generates (HumanEval's 1024 under lm-eval), capped by the
# model's positions. Without it HFLM takes the model's own (131 072 for Llama-3.2): `--batch-size auto` then
# probes batches that long, runs out of memory at every size and falls back to 1.
PROMPT_TOKENS, MAX_NEW_TOKENS = 2048, 1024


def max_length_for(model_config, max_gen_toks: int | None = None) -> int:
    """Prompt budget + new tokens, at most the model's `max_position_embeddings`."""
    positions = getattr(model_config, "max_position_embeddings", None) or PROMPT_TOKENS + MAX_NEW_TOKENS
    return min(int(positions), PROMPT_TOKENS + (max_gen_toks or MAX_NEW_TOKENS))


def evaluate_checkpoint(model_path: str | os.PathLike, task: str, tasks_dir: str | os.PathLike, *,
                        data_dir=None, languages=None, limit: int | None = None, batch_size: int | str = 1,
                        device: str = "cpu", dtype: str = "float32", num_fewshot: int | None = None,
                        max_gen_toks: int | None = None, parallelize: bool = False, seed: int = 0,
                        protocol: str = "paper", model=None) -> dict | None:
    """Evaluate a saved checkpoint on one of the four tasks with lm-eval's own `HFLM`, under `protocol`
    ("paper" or "lm-eval", `dume.reasoning.tasks`). `seed` seeds lm-eval's python, numpy and torch generators
    before any request, so samples follow it. Returns {"score", "metric", "per_task", ...}; None on non-zero
    ranks of a multi-process (accelerate launch) run, where only rank 0 gets results."""
    from dume.reasoning.tasks import write_task_configs

    spec = write_task_configs(task, tasks_dir, data_dir, languages, protocol=protocol)
    _preflight_hub(spec)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise DumeError(f"lm-eval is not installed ({e}): pip install 'lm-eval==0.4.13'") from e
    # The original's tokenizer defaults added BOS (Llama 3: <|begin_of_text|>); HFLM adds none unless asked.
    bos = {"add_bos_token": True} if protocol == "paper" else {}
    if model is None:
        from transformers import AutoConfig

        max_length = max_length_for(AutoConfig.from_pretrained(str(model_path)), max_gen_toks)
        lm = HFLM(pretrained=str(model_path), device=device, dtype=dtype, batch_size=batch_size,
                  parallelize=parallelize, trust_remote_code=False, max_length=max_length, **bos)
    else:
        max_length = max_length_for(model.config, max_gen_toks)
        lm = HFLM(pretrained=model, tokenizer=str(model_path), batch_size=batch_size, max_length=max_length, **bos)
    nshot = spec.num_fewshot if num_fewshot is None else num_fewshot
    gen_kwargs = f"max_gen_toks={max_gen_toks}" if max_gen_toks else None
    # Our dume_* tasks include the stock YAMLs by path: only hub tasks need lm-eval's built-in index (seconds).
    own = all(t.startswith("dume_") for t in spec.tasks)
    tm = TaskManager(include_path=str(tasks_dir), include_defaults=not own)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(spec.tasks), num_fewshot=nshot, limit=limit,
                                  task_manager=tm, gen_kwargs=gen_kwargs, bootstrap_iters=0, log_samples=False,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, confirm_run_unsafe_code=True)
    if out is None:  # not rank 0
        return None
    per_task = {}
    for t in spec.tasks:
        res = out["results"].get(t)
        if res is None or spec.metric not in res:
            raise DumeError(f"lm-eval returned no {spec.metric} for {t} (got {sorted(res or {})})")
        per_task[t] = float(res[spec.metric])
    score = sum(per_task.values()) / len(per_task)
    raw = {t: {k: v for k, v in out["results"][t].items() if isinstance(v, (int, float, str))} for t in spec.tasks}
    return {"score": score, "metric": spec.metric, "per_task": per_task, "lm_eval_tasks": list(spec.tasks),
            "protocol": spec.protocol, "seed": seed, "num_fewshot": nshot, "max_length": max_length,
            "limit": limit, "data": spec.source, "notes": list(spec.notes),
            "lm_eval_version": getattr(lm_eval, "__version__", None), "raw_results": raw,
            "n_samples": {t: out.get("n-samples", {}).get(t) for t in spec.tasks}}
