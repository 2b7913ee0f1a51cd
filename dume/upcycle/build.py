"""`dume build CONFIG.yaml`: DUME on your own experts, from a small YAML.

    experts:                 # two or more; any names
      - name: law
        model: path/or/hub-id
        data: path/or/hub-dataset   # .txt/.jsonl/.json/.parquet file or folder, or a hub dataset id
        # optional: split (train), field (text), max_docs,
        #           adapter: path/or/hub-id of a PEFT LoRA adapter on `model` (then `model` is its base)
    gate: dume               # dume | sequential_balanced | centroid | random
    k: 1
    lambda: 0.01
    temperature: 1.0
    num_dume_tokens: null    # all tokens of each document
    dtype: auto              # auto | float32 | bfloat16: the forward passes (auto: the experts' dtype where the
                             #   device computes it natively -- bf16 on GPUs and bf16-capable CPUs -- else float32)
    out: path/to/moe
    # optional: seq_len (1024), batch_size (8), held_out (0.05), seed (0), device (auto),
    #           max_shard_size (5GB: the largest safetensors file written),
    #           evaluate (false; true or {random_routing: true}: the evaluation report, dume.upcycle.evaluate)

Everything is checked before heavy work (keys and values, the experts' compatibility, each expert's data). Then
the ridge statistics are collected through each domain's oracle, the routers solved and the experts MoErged with
them in one streamed pass (`dume.upcycle.pipeline.build_moe`), and `out` receives -- in one atomic rename -- a
standard checkpoint of the experts' MoE class, the statistics (`dume_stats/`), the recipe (`dume_router.json`, so
`dume_experts.py add/remove/reweight` work on it) and a model card (`README.md`) with the per-domain routing
shares measured on held-out documents.

An expert with `adapter:` is the adapter merged into its `model:` by peft (`merge_and_unload`, needs
`pip install 'dume[lora]'`), in the base's stored dtype, one expert at a time, into a cache keyed by the base's
and the adapter's contents (`$DUME_CACHE/merged_adapters/`, else `$HF_HOME/dume_merged/`; reused by a rerun);
from there on it is an ordinary expert, and experts with and without adapters mix. Refused before any merge:
an adapter whose `adapter_config.json` names another base than `model:` (the same string, hub id, folder or
tensors count as the same; a base not recorded, or not here to compare, is a printed note), a missing or
corrupt adapter, a type peft cannot merge into the weights (only LoRA, AdaLoRA, LoHa, LoKr), peft missing.
`dume_build.json` and the card name each such expert's base and adapter; `dume_build.json` and the recipe name
its merged folder, which `dume_experts.py` edits that re-read the experts need (a rerun of the build remakes it).

Text files hold one document per blank-line-separated paragraph; JSON Lines / JSON / Parquet records give their
`field`. A domain's held-out documents (the last `held_out` fraction, at most 64) are not used for the statistics.
With `evaluate`, they also give the evaluation report (MoE vs each expert vs model averaging, normalised scores,
a routing heatmap; `dume eval CONFIG.yaml` makes it for a MoE already built).
"""

from __future__ import annotations

import time
from pathlib import Path

from dume.errors import DumeError
from dume.runtime.devices import compute_dtype, resolve_device
from dume.text.files import expert_texts
from dume.upcycle.card import model_card
from dume.upcycle.pipeline import build_moe
from dume.upcycle.spec import GATES, MAX_HELD_OUT, BuildSpec


def split_held_out(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(statistics documents, held-out documents): the last `fraction` (at most 64), and none when that would leave
    no statistics document."""
    n = min(MAX_HELD_OUT, int(len(texts) * fraction))
    if n == 0 or n >= len(texts):
        return texts, []
    return texts[:-n], texts[-n:]


def build(spec: BuildSpec, *, overwrite: bool = False, log=print) -> dict:
    """Run the whole build; return the summary written into the model card. `out` is locked against a second
    writer for the whole build (`dume.checkpoint.outputs.output_lock`)."""
    from dume.checkpoint.outputs import output_lock

    out = Path(spec.out)
    with output_lock(out):  # one writer of `out` from here to the final rename
        if out.exists() and not overwrite:
            raise DumeError(f"{out} exists; pass --overwrite to replace it")
        return _build(spec, out, overwrite, log)


def _build(spec: BuildSpec, out: Path, overwrite: bool, log) -> dict:
    from dume.checkpoint.experts import check_experts
    from dume.checkpoint.io import atomic_dir, atomic_write_json, atomic_write_text
    from dume.checkpoint.outputs import check_output_path
    from dume.checkpoint.resolve import resolve_expert
    from dume.runtime.memory import release_memory
    from dume.text.tokenizer import load_tokenizer

    clock = [time.perf_counter()]

    def phase(what: str) -> None:
        """One line per phase with its time: where a slow build spends it."""
        now = time.perf_counter()
        log(f"{what} in {now - clock[0]:.1f} s")
        clock[0] = now

    names = [e.name for e in spec.experts]
    dirs = [resolve_expert(e.model) for e in spec.experts]
    adapters = checked_adapters(spec, dirs, log)
    check_output_path(out, dirs + [a.dir for a in adapters.values()], "out")  # hub ids resolve only now
    es = check_experts(dirs, require_moe_compatible=True)  # an adapter's base stands in for its merge
    phase(f"checked and fingerprinted {len(dirs)} experts" + (f" ({len(adapters)} adapters on their bases)"
                                                              if adapters else ""))
    if es.tokenizer_dir is None:
        raise DumeError("no expert has tokenizer files: the documents cannot be tokenized")
    docs, held, sources = {}, {}, {}
    for e in spec.experts:  # every expert's data is read before any heavy work
        texts, sources[e.name] = expert_texts(e)
        docs[e.name], held[e.name] = split_held_out(texts, spec.held_out)
        log(f"{e.name}: {len(docs[e.name])} documents for the statistics, {len(held[e.name])} held out "
            f"({sources[e.name]})")
        if spec.evaluate and not held[e.name]:
            raise DumeError(f"{e.name}: too few documents to hold any out for the evaluation ({len(texts)} with "
                            f"held_out {spec.held_out}); raise held_out or give more documents")
    phase("read the documents")
    if adapters:
        from dume.checkpoint.adapters import merged_expert

        dirs = [merged_expert(adapters[i], log=log) if i in adapters else d for i, d in enumerate(dirs)]
        es = check_experts(dirs, require_moe_compatible=True)  # the merged experts themselves
        phase(f"merged {len(adapters)} adapters")
    for n in es.notes:
        log(f"note: {n}")
    for w in es.warnings:
        log(f"warning: {w}")
    tokenizer = load_tokenizer(es.tokenizer_dir)
    device = resolve_device(spec.device)
    dtype = compute_dtype(spec.dtype, device, es.stored_dtype)
    log(f"forward passes on {device} in {str(dtype).removeprefix('torch.')} (dtype: {spec.dtype}; the experts "
        f"store {str(es.stored_dtype).removeprefix('torch.')})")
    cfg = es.config
    max_len = min(spec.seq_len, cfg.max_position_embeddings)
    with atomic_dir(out, overwrite=overwrite) as stage:
        log(f"MoErging {len(dirs)} {es.arch.dense_class} experts into a {es.arch.moe_class}")
        stats, counts = build_moe(
            dirs, names, docs, stage, tokenizer, strategy=GATES[spec.gate], k=spec.k, lam=spec.lam,
            temperature=spec.temperature, num_dume_tokens=spec.num_dume_tokens, max_len=max_len,
            batch_size=spec.batch_size, device=device, dtype=dtype, seed=spec.seed,
            max_shard_size=spec.max_shard_size, data_source="dume build",
            extra_meta={"sources": sources, "seq_len": max_len, "stats_batch_size": spec.batch_size},
            expert_set=es, log=log)
        release_memory()
        phase("statistics, gates and the MoE written")
        shares = held_out_routing(stage, held, tokenizer, max_len, spec.batch_size, device, dtype)
        if shares is not None:
            phase("held-out routing check")
        report = None
        if spec.evaluate:
            from dume.upcycle.evaluate import evaluate_moe

            report = evaluate_moe(stage, held, experts=dict(zip(names, dirs)), seq_len=max_len,
                                  batch_size=spec.batch_size, device=device, dtype=dtype, seed=spec.seed,
                                  random_routing=spec.evaluate_random_routing, write=False, expert_set=es,
                                  log=log)
            phase("evaluation report")
        summary = {"experts": [{"name": e.name, "model": e.model,
                                **({"adapter": e.adapter, "merged": str(dirs[i])} if e.adapter else {}),
                                "data": sources[e.name], "documents": len(docs[e.name]),
                                "held_out": len(held[e.name]), "tokens": (counts or {}).get(e.name)}
                               for i, e in enumerate(spec.experts)],
                   "architecture": f"{es.arch.dense_class} -> {es.arch.moe_class}",
                   "settings": {"gate": spec.gate, "k": spec.k, "lambda": spec.lam,
                                "temperature": spec.temperature, "num_dume_tokens": spec.num_dume_tokens,
                                "seq_len": max_len, "batch_size": spec.batch_size, "dtype": str(dtype),
                                "seed": spec.seed},
                   "routing_shares": shares}
        atomic_write_json(stage / "dume_build.json", summary)
        atomic_write_text(stage / "README.md", model_card(summary, spec))
        if report is not None:
            from dume.upcycle.evaluate import write_report

            write_report(stage, report, names)
    phase(f"wrote {out}")
    return summary


def checked_adapters(spec: BuildSpec, dirs: list[Path], log) -> dict:
    """{expert index: checked `Adapter`} for the experts given as `model:` + `adapter:`, every one checked (peft
    installed, files, type, base) before any merge; notes about bases that cannot be verified are printed."""
    if not any(e.adapter for e in spec.experts):
        return {}
    from dume.checkpoint.adapters import check_adapter, require_peft
    from dume.checkpoint.resolve import resolve_adapter

    require_peft()
    out = {}
    for i, e in enumerate(spec.experts):
        if e.adapter:
            out[i] = check_adapter(e.adapter, resolve_adapter(e.adapter), e.model, dirs[i])
            if out[i].note:
                log(f"note: {e.name}: {out[i].note}")
    return out


def held_out_routing(moe_dir: Path, held: dict[str, list[str]], tokenizer, max_len: int, batch_size: int,
                     device: str, dtype) -> dict | None:
    """{domain: {"own": share of its held-out tokens routed to its own expert (mean over layers), "per_layer":
    [[share per expert] per layer]}}; None without held-out text.

    The MoE is never held whole: `dume.moe.routing.streamed_routing_shares` runs it one decoder layer at a time
    from the checkpoint (it used to be loaded whole, in float32 on a CPU: 14.6 GB for four Llama-3.2-1B
    experts, issue 23). `held_out: 0` skips it."""
    import torch

    from dume.moe.routing import routing_accuracy, streamed_routing_shares
    from dume.text.batches import document_batches

    if not any(held.values()):
        return None
    blocks = {}
    for d, texts in held.items():
        batches = list(document_batches(texts, tokenizer, max_len, batch_size))
        if batches:
            width = max(b[0].shape[1] for b in batches)
            pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
            blocks[d] = (torch.cat([pad(b[0]) for b in batches]), torch.cat([pad(b[1]) for b in batches]))
    if not blocks:
        return None
    shares = streamed_routing_shares(moe_dir, blocks, batch_size, device=device, dtype=dtype)
    own = routing_accuracy(shares, {d: i for i, d in enumerate(held)})
    return {d: {"own": sum(own[d]) / len(own[d]), "per_layer": s} for d, s in shares.items()}




def evaluate_built(spec: BuildSpec, *, random_routing: bool | None = None, keep_averaging=None, log=print) -> dict:
    """`dume eval CONFIG.yaml`: the evaluation report of the MoE the config built (at `out`), on the same held-out
    documents the build kept aside, with the config's settings; the experts are those the MoE's recipe names."""
    from dume.checkpoint.experts import check_experts
    from dume.checkpoint.outputs import output_lock
    from dume.upcycle.evaluate import evaluate_moe, moe_experts

    out = Path(spec.out)
    held = {}
    for e in spec.experts:
        texts, _ = expert_texts(e)
        held[e.name] = split_held_out(texts, spec.held_out)[1]
        if not held[e.name]:
            raise DumeError(f"{e.name}: no held-out documents (held_out {spec.held_out}, {len(texts)} documents): "
                            "nothing to evaluate on")
    with output_lock(out):  # no build or edit of `out` while its report is written
        experts = moe_experts(out)
        if list(experts) != [e.name for e in spec.experts]:
            raise DumeError(f"{out} holds experts {', '.join(experts)}; the config names "
                            f"{', '.join(e.name for e in spec.experts)}")
        device = resolve_device(spec.device)
        es = check_experts(list(experts.values()))
        dtype = compute_dtype(spec.dtype, device, es.stored_dtype)
        return evaluate_moe(out, held, experts=experts, seq_len=spec.seq_len, batch_size=spec.batch_size,
                            device=device, dtype=dtype, seed=spec.seed, keep_averaging=keep_averaging, expert_set=es,
                            random_routing=spec.evaluate_random_routing if random_routing is None else random_routing,
                            log=log)
