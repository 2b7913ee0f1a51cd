#!/usr/bin/env python
"""The MoErging rows of Table 2: turn the dense experts into one MoE and evaluate it.

  oracle          every token of domain d goes to expert d (a dense Llama per domain)
  random_routing  MoErged model, seeded random gates, no training
  centroid        each gate = the normalised mean feature of its domain (DUME's λ→∞ limit;
                  mergekit's "hidden" gate; not in the paper's tables)
  DUME            gates = the column-normalised ridge-regression solution (A + λI)⁻¹b
  BTX             random gates trained on the shuffled union of the domains (k=2, lr 1e-4)
  DUMEplus        DUME gates, then trained like BTX (k=1, lr 1e-5)

Every model is saved with `save_pretrained` (a plain MixtralForCausalLM, or Llama for
the oracle); DUME and DUME+ keep their ridge statistics beside it. The statistics are
computed once per (num-dume-tokens, num-dume-stats-steps) and cached in RUN_DIR/stats/,
because they do not depend on λ, k or the temperature: a sweep over those is free.

The paper trains BTX/DUME+ for 1000 steps; the CPU default is --num-steps 100.
"""

from __future__ import annotations

import sys

from dume.checkpoint.fingerprint import built_from
from dume.cli import base_parser, run_main
from dume.clm.run import Run, write_result
from dume.errors import DumeError
from dume.routers import registry as strategies  # the registry: every method's gates, defaults, needs

METHODS = ("oracle", *strategies.names(routed=True))
PAPER_METHODS = ("oracle", *strategies.names(routed=True, paper=True))  # Table 2's rows, run by run_clm.py


def parse(argv):
    p = base_parser(__doc__)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--domains", default="all", help="experts to combine (comma-separated), or 'all'")
    p.add_argument("--k", type=int, default=None, help="experts per token (default 1; BTX 2)")
    p.add_argument("--temp", type=float, default=1.0, help="router softmax temperature (CLM: 1)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.01, help="ridge regulariser λ")
    p.add_argument("--relative-lambda", action="store_true", help="use λ·trace(A)/H (scale-free λ)")
    p.add_argument("--num-dume-tokens", type=int, default=None, help="tokens per document for the statistics (default: all)")
    p.add_argument("--num-dume-stats-steps", type=int, default=None, help="batches per domain for the statistics (default: all)")
    p.add_argument("--stats-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="router lr (BTX 1e-4, DUME+ 1e-5)")
    p.add_argument("--num-steps", type=int, default=100, help="router training steps (paper: 1000)")
    p.add_argument("--warmup", type=int, default=None, help="router warmup steps (default: 10%% of --num-steps)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--alpha", type=float, default=0.0, help="load-balancing coefficient (off, as in the paper)")
    p.add_argument("--tag", default=None, help="suffix for the result name, e.g. for sweeps")
    args = p.parse_args(argv)
    strategy = strategies.get(args.method)  # the paper's per-method defaults (Section 3.1)
    args.k = args.k if args.k is not None else strategy.k
    args.lr = args.lr if args.lr is not None else (strategy.lr or 1e-4)
    return args


def validate(args, num_experts: int) -> None:
    """Every flag checked before any heavy work."""
    if not 1 <= args.k <= num_experts:
        raise DumeError(f"--k {args.k} is out of range: choose 1..{num_experts} (the number of experts)")
    if not args.temp > 0:
        raise DumeError(f"--temp must be > 0, got {args.temp}")
    if not args.lam > 0:
        raise DumeError(f"--lambda must be > 0, got {args.lam}")
    if args.num_dume_tokens is not None and args.num_dume_tokens < 1:
        raise DumeError("--num-dume-tokens must be at least 1")
    if args.num_dume_stats_steps is not None and args.num_dume_stats_steps < 1:
        raise DumeError("--num-dume-stats-steps must be at least 1")
    if args.alpha < 0:
        raise DumeError("--alpha must be >= 0")


def stats_key(args, kind: str = "dume") -> str:
    """The statistics' cache folder: what the sums depend on besides the experts and data.
    Layer-sequential statistics also depend on the router settings of the earlier layers."""
    key = f"tokens-{args.num_dume_tokens or 'all'}_steps-{args.num_dume_stats_steps or 'all'}"
    if kind == "sequential":
        key += f"_sequential-lambda-{args.lam:g}{'-rel' if args.relative_lambda else ''}_T-{args.temp:g}_k-{args.k}"
    elif kind != "dume":
        key += f"_{kind}"
    return key


def expert_set_key(run: Run, domains: list[str]) -> str:
    """'' for the run's full expert set, else a name for the subset, so that a subset's
    MoE base and statistics never replace the full set's."""
    return "" if list(domains) == run.domains() else "_" + "-".join(domains)


def get_stats(run: Run, args, expert_set, domains, base_dir):
    """The ridge statistics for this expert set, collected once and cached.

    The cache is keyed by everything the sums depend on: every expert's content
    fingerprint (an MLP-only change of one expert changes it, while the shared-weight
    fingerprint of the base does not), the base's shared weights, the domains, the data,
    the tokenizer and the collection settings. Any difference recollects, saying why."""
    from dume.checkpoint.experts import shared_weights_fingerprint
    from dume.corpora import documents as data
    from dume.routers.closed_form import layer_solver
    from dume.stats.collectors import collect_for
    from dume.stats.ridge import RidgeStats

    experts = list(expert_set.dirs)
    fingerprint = shared_weights_fingerprint(base_dir)
    provenance = {"num_dume_stats_steps": args.num_dume_stats_steps,
                  "stats_batch_size": args.stats_batch_size, "seq_len": run.seq_len, "source": run.source,
                  "data_dir": run.data_dir, "tokenizer": run.tokenizer_fingerprint(),
                  "expert_fingerprints": list(expert_set.fingerprints), "corpus": run.corpus_stamps(domains)}
    kind = strategies.get(args.method).statistics
    cache = run.run_dir / f"stats{expert_set_key(run, domains)}" / stats_key(args, kind)
    if (cache / "stats.json").is_file() and not args.redo:
        try:
            stats = RidgeStats.load(cache)
        except DumeError as e:  # corrupted, or written in an older layout: a cache, so redo it
            print(f"cached statistics {cache} are unusable ({e}); recollecting")
        else:
            differs = [k for k, v in provenance.items() if stats.meta.get(k) != v]
            if stats.meta.get("model_fingerprint") != fingerprint:
                differs.append("shared weights")
            if list(stats.domains) != list(domains):
                differs.append("domains")
            if not differs:
                print(f"using cached statistics {cache}")
                return stats
            print(f"cached statistics {cache} differ in {', '.join(differs)}; recollecting")
    docs = {d: data.iter_documents(d, "train", run.source, data_dir=run.data_dir)[0] for d in domains}
    stats, _ = collect_for(kind, experts, domains, docs, run.tokenizer, moe_dir=base_dir, k=args.k,
                           solve_layer=layer_solver(args.lam, args.temp, args.relative_lambda),
                           num_dume_tokens=args.num_dume_tokens, max_len=run.seq_len,
                           batch_size=args.stats_batch_size, model_fingerprint=fingerprint, device=run.device,
                           data_source=f"{run.source}:train", extra_meta=provenance,
                           max_batches=args.num_dume_stats_steps)
    stats.save(cache)
    return stats


def prompt_gate_inputs(run: Run, domains) -> dict:
    """What mergekit's hidden gate reads: the base model (the run's seed model, which the
    experts were fine-tuned from), the tokenizer, and a user's handful of prompts, stood
    in for by the first 8 training documents of each domain (64 tokens each)."""
    from dume.corpora import documents as data
    from dume.routers.prompt_hidden import first_prompts

    base = run.require_checkpoint(run.seed_dir, "clm_pretrain.py")
    prompts = {d: first_prompts(data.iter_documents(d, "train", run.source, data_dir=run.data_dir)[0],
                                run.tokenizer) for d in domains}
    return {"base_model": base, "tokenizer": run.tokenizer, "prompts": prompts}


def main(argv=None):
    from dume.checkpoint.outputs import output_lock
    from dume.runtime.distributed import run_on_main_only, world_size

    args = parse(argv)
    # Under accelerate launch the main process runs it alone; router training keeps the
    # launch's batch (per-device batch x processes per micro-batch: what DDP averages over,
    # for the embedded recipe's mean and the original's summed micro-batches alike).
    if run_on_main_only(__file__, sys.argv[1:] if argv is None else argv,
                        ["--batch-size", str(args.batch_size * world_size())]):
        return
    strategy = strategies.get(args.method)
    run = Run.from_args(args)
    domains = run.select_domains(args.domains)
    validate(args, len(domains))
    if strategy.routed:  # every domain has training text, before any heavy work
        from dume.corpora import documents as data

        for d in domains:
            data.has_documents(d, "train", run.source, data_dir=run.data_dir)
    name = args.method if not args.tag else f"{args.method}_{args.tag}"
    model_dir = run.model_dir(name)
    # One writer of this strategy's model and result from the first check to the last write:
    # a second run of the same strategy on this run directory refuses at once.
    with output_lock(model_dir), output_lock(run.result_path(name)):
        evaluate_strategy(args, run, strategy, domains, name, model_dir)


def evaluate_strategy(args, run: Run, strategy, domains: list[str], name: str, model_dir) -> None:
    """Skip what is done; else the oracles (dense), or the routed MoE via `evaluate_routed`."""
    from dume.checkpoint.experts import check_experts
    from dume.checkpoint.io import portable_path
    from dume.moe.merge import write_oracle
    from dume.upcycle.pipeline import shared_zero_gate_base

    inputs = {f"{d} expert": run.expert_dir(d) for d in domains}
    models = {"model": model_dir} if strategy.routed else {d: model_dir / d for d in domains}
    if run.done(name, args.redo, inputs=inputs, models=models):
        return
    experts = [run.require_checkpoint(run.expert_dir(d), f"clm_train_experts.py --domain {d}") for d in domains]
    expert_set = check_experts(experts)  # configs, tokenizers, shapes, NaN/inf: before anything is written
    for w in expert_set.warnings:
        print(f"warning: {w}")
    run.load(experts[0], "clm_train_experts.py")  # tokenizer/vocabulary check before heavy work
    input_fps = run.begin(name, inputs)
    made_from = {"dume_domains": domains, "dume_expert_fingerprints": list(expert_set.fingerprints)}
    payload = {"name": name, "method": args.method, "domains": domains, "experts": [str(e) for e in experts],
               "settings": {k: v for k, v in vars(args).items() if k not in ("redo",)}}

    if not strategy.routed:  # the oracle: one dense model per domain
        results = {}
        for i, d in enumerate(domains):
            path = model_dir / d
            if args.redo or not built_from(path, made_from):
                write_oracle(experts, i, path, extra_config=made_from)
            results[d] = run.evaluate(run.load(path, "clm_moerging_strategies_eval.py"), [d],
                                      args.eval_batch_size, label=f"oracle[{d}]")[d]
        payload.update(model=str(model_dir), results=results)
        write_result(run, name, payload, inputs=input_fps, models=models)
        print("oracle".ljust(20), " ".join(f"{d}={r['perplexity']:.2f}" for d, r in results.items()))
        return

    # The MoErged model with zero gates, built once and reused by every router; rebuilt
    # when the experts' contents (or the domain set) differ from those it was made from,
    # and shared by every strategy's run (`dume.upcycle.pipeline.shared_zero_gate_base`).
    base_dir = run.model_dir(f"_moe_base{expert_set_key(run, domains)}")
    with shared_zero_gate_base(experts, base_dir, made_from, redo=args.redo,
                               extra_config={"dume_experts": [portable_path(e, base_dir) for e in experts]}):
        evaluate_routed(args, run, strategy, domains, name, model_dir, experts, expert_set, base_dir, payload,
                        input_fps, models)


def router_training(args, run: Run, domains, name: str):
    """BTX / DUME+ training: the run's recipe (embedded or original), the training windows
    of every domain mixed, each domain's validation windows."""
    from dume.routers.training import mixed_blocks
    from dume.train.loop import TrainConfig, windows_budget
    from dume.upcycle.pipeline import RouterTraining

    warmup = args.warmup if args.warmup is not None else max(1, args.num_steps // 10)
    cfg = TrainConfig.with_recipe(
        "original" if run.recipe_name == "original" else "embedded", lr=args.lr, steps=args.num_steps,
        warmup=warmup, batch_size=args.batch_size, grad_accum=args.grad_accum,
        eval_every=max(1, args.num_steps // 4), seed=args.seed, mixed_precision=args.mixed_precision,
        param_dtype="bfloat16" if args.pure_bf16 else None, wandb_project=args.wandb_project)
    train_data = mixed_blocks([run.blocks(d, "train", max_windows=windows_budget(cfg)) for d in domains])
    val_data = mixed_blocks([run.blocks(d, "validation") for d in domains])
    return RouterTraining(train_data, val_data, cfg, alpha=args.alpha, desc=name)


def evaluate_routed(args, run: Run, strategy, domains, name, model_dir, experts, expert_set, base_dir, payload,
                    input_fps, models) -> None:
    """A routed strategy from the zero-gate base (`dume.upcycle.pipeline.build_routed`:
    gates, router training if any, statistics and recipe), then its evaluation."""
    import torch

    from dume.checkpoint.io import atomic_dir
    from dume.moe.edit import load_moe
    from dume.moe.routing import routing_accuracy, routing_shares
    from dume.upcycle.pipeline import RouterSettings, build_routed

    stats = get_stats(run, args, expert_set, domains, base_dir) if strategy.needs_statistics else None
    if stats is not None:
        payload["token_counts"] = stats.token_counts()
    training = router_training(args, run, domains, name) if strategy.trains_router else None
    settings = RouterSettings(k=args.k, lam=args.lam, temperature=args.temp, relative_lambda=args.relative_lambda,
                              seed=args.seed, num_dume_tokens=args.num_dume_tokens)
    # Everything is built, trained and evaluated in a hidden sibling directory that
    # replaces models/<name> only when finished: a run killed halfway (a --redo of BTX at
    # step 7, say) leaves the previous model and its results as they were.
    with atomic_dir(model_dir) as stage:
        built = build_routed(args.method, experts, domains, stage, settings=settings, stats=stats, base_dir=base_dir,
                             training=training, expert_set=expert_set,
                             gate_inputs=prompt_gate_inputs(run, domains) if strategy.needs_prompts else None)
        if built.history is not None:
            payload["history"] = built.history
        if strategy.context_routing:
            from dume.train.models import load_model

            model = load_model(stage).eval()
        else:
            model = load_moe(stage)
        with torch.no_grad():
            results = run.evaluate(model, domains, args.eval_batch_size, label=name)
            shares = routing_shares(run.on_device(model), {d: run.blocks(d, "test") for d in domains},
                                    args.eval_batch_size)
    accuracy = routing_accuracy(shares, {d: i for i, d in enumerate(domains)})
    payload.update(model=str(model_dir), results=results, routing_shares=shares, routing_accuracy=accuracy)
    write_result(run, name, payload, inputs=input_fps, models=models)
    print(name.ljust(20), " ".join(f"{d}={r['perplexity']:.2f}" for d, r in results.items()))
    print("routing accuracy, last layer:", {d: round(a[-1], 3) for d, a in accuracy.items()})


if __name__ == "__main__":
    sys.exit(run_main(main))
