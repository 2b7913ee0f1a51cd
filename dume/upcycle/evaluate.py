"""The evaluation report of a built MoE (`dume eval`, and `evaluate: true` in `dume build`): is it any good?

On each domain's held-out documents it measures the perplexity of the MoE, of every expert, of model averaging
(the experts' uniform parameter average, built into a temporary folder and removed unless `keep_averaging` names
a place for it) and, optionally, of random routing (the MoE with seeded random routers, evaluated without writing
it). From them: the paper's normalised score 100·p̂_d/p_d per domain (p̂_d = the domain's own expert) and its
average, the share of the averaging → own-expert gap the MoE closes, and where the MoE's tokens go per layer. It
writes `dume_eval.json`, a heatmap `dume_eval_routing.png` and a section of the model card (`README.md`).

Documents are packed as the CLM scripts pack their test split (`[bos] doc [eos] …` cut into `seq_len` blocks,
`dume.text.batches.pack_documents`), and perplexity is the CLM scripts' (`dume.train.perplexity`), so on the same
documents the numbers equal `clm_moerging_strategies_eval.py`'s (tests/test_evaluate_report.py). Every model runs
one decoder layer at a time from its checkpoint (`dume.moe.streamed`): the peak is one layer plus the hidden
states, never the MoE. Cost: (D + 2) models, D + 3 with random routing, each over all D domains' documents.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from dume.errors import DumeError

REPORT_FILE = "dume_eval.json"
HEATMAP_FILE = "dume_eval_routing.png"
CARD_BEGIN, CARD_END = "<!-- dume eval: begin -->", "<!-- dume eval: end -->"
MOE, AVERAGING, RANDOM = "MoE", "model_averaging", "random_routing"


def moe_experts(moe_dir: Path) -> dict[str, Path]:
    """{domain: expert checkpoint} of a MoE written by `dume build` or the strategies scripts, in expert order,
    from its router recipe."""
    from dume.checkpoint.io import read_json
    from dume.moe.recipe import RECIPE_FILE, resolve_recipe_paths

    path = Path(moe_dir) / RECIPE_FILE
    if not path.is_file():
        raise DumeError(f"{moe_dir} has no {RECIPE_FILE}: name its experts with --expert DOMAIN=PATH")
    recipe = resolve_recipe_paths(read_json(path), Path(moe_dir))
    return dict(zip(recipe["domains"], map(Path, recipe["experts"])))


def _domain_nll(model_dir, ids, mask, owner, domains, *, batch_size, device, dtype, gates=None, count=None):
    """{domain: (summed NLL, tokens)} of the checkpoint at `model_dir` over the stacked blocks."""
    from dume.moe.streamed import streamed_forward
    from dume.train.perplexity import row_nll

    sums = torch.zeros(len(domains), dtype=torch.float64)
    tokens = torch.zeros(len(domains), dtype=torch.long)

    def add(start: int, logits) -> None:
        rows = slice(start, start + len(logits))
        nll, n = row_nll(logits, ids[rows].to(logits.device), mask[rows].to(logits.device))
        sums.index_add_(0, owner[rows], nll.cpu())
        tokens.index_add_(0, owner[rows], n.cpu())

    streamed_forward(model_dir, ids, mask, batch_size=batch_size, device=device, dtype=dtype, on_logits=add,
                     gates=gates, on_router_logits=count)
    out = {}
    for j, d in enumerate(domains):
        if tokens[j] == 0:
            raise DumeError(f"domain {d}: no tokens to evaluate")
        loss = float(sums[j]) / int(tokens[j])
        if not math.isfinite(loss):
            raise DumeError(f"{model_dir}: non-finite loss on domain {d}")
        out[d] = {"loss": loss, "perplexity": math.exp(loss), "tokens": int(tokens[j])}
    return out


def evaluate_moe(moe_dir, texts: dict[str, list[str]], *, experts: dict[str, Path] | None = None, seq_len: int = 1024,
                 batch_size: int = 8, device: str = "cpu", dtype=None, random_routing: bool = False, seed: int = 0,
                 keep_averaging=None, write: bool = True, expert_set=None, log=print) -> dict:
    """The report of the MoE at `moe_dir` on `texts` ({domain: documents}, every domain one of its experts');
    written into `moe_dir` when `write`. `experts` defaults to the MoE's recipe; `expert_set`: their
    `check_experts` result when the caller has it."""
    from dume.checkpoint.experts import check_experts
    from dume.moe.edit import num_experts, open_moe
    from dume.moe.routing import ShareCounter, routing_accuracy, stack_blocks
    from dume.routers.registry import GateContext, make_gates
    from dume.text.batches import pack_documents
    from dume.text.tokenizer import load_tokenizer
    from dume.train.perplexity import normalised_scores

    moe_dir, cfg, _ = open_moe(moe_dir)
    experts = {d: Path(p) for d, p in (experts or moe_experts(moe_dir)).items()}
    if len(experts) != num_experts(cfg):
        raise DumeError(f"{len(experts)} experts named for the {num_experts(cfg)} experts of {moe_dir}")
    unknown = sorted(set(texts) - set(experts))
    if unknown or not texts:
        raise DumeError(f"documents for {', '.join(unknown) or 'no domain'}: evaluate on the MoE's domains "
                        f"({', '.join(experts)})")
    # missing or mismatched experts fail here, before any forward pass
    es = expert_set or check_experts(list(experts.values()))
    if keep_averaging is not None:
        from dume.checkpoint.outputs import check_output_path

        keep_averaging = Path(keep_averaging)
        if keep_averaging.exists():
            raise DumeError(f"--keep-averaging {keep_averaging} exists: name a new folder (nothing is replaced)")
        check_output_path(keep_averaging, [moe_dir, *es.dirs], "--keep-averaging")
    tokenizer = load_tokenizer(moe_dir)
    seq_len = min(seq_len, cfg.max_position_embeddings)
    domains = list(texts)
    blocks = {}
    for d in domains:
        if not texts[d]:
            raise DumeError(f"domain {d}: no documents to evaluate on")
        blocks[d] = pack_documents(texts[d], tokenizer, seq_len)
    ids, mask, owner = stack_blocks(blocks)
    D = num_experts(cfg)
    count = ShareCounter(mask, owner, domains, cfg.num_hidden_layers, D, cfg.num_experts_per_tok)

    run = dict(batch_size=batch_size, device=device, dtype=dtype)
    n_models = D + 2 + int(random_routing)
    log(f"evaluating {n_models} models on {len(domains)} domains ({len(ids)} blocks of {seq_len} tokens): "
        f"{n_models * len(ids)} block forward passes")
    results, seconds = {}, {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        results[name] = fn()
        seconds[name] = time.perf_counter() - start
        log(f"  {name}: " + ", ".join(f"{d} {r['perplexity']:.3f}" for d, r in results[name].items())
            + f" ({seconds[name]:.1f} s)")

    timed(MOE, lambda: _domain_nll(moe_dir, ids, mask, owner, domains, count=count, **run))
    for d, path in experts.items():
        timed(f"{d}_expert", lambda path=path: _domain_nll(path, ids, mask, owner, domains, **run))
    timed(AVERAGING, lambda: _averaging_nll(es, moe_dir, keep_averaging, ids, mask, owner, domains, run))
    if random_routing:
        gates = make_gates("random_routing", None, GateContext(num_layers=cfg.num_hidden_layers, num_experts=D,
                                                                hidden_size=cfg.hidden_size, seed=seed))
        timed(RANDOM, lambda: _domain_nll(moe_dir, ids, mask, owner, domains, gates=gates, **run))
    ppl = {name: {d: r["perplexity"] for d, r in res.items()} for name, res in results.items()}
    reference = {d: ppl[f"{d}_expert"][d] for d in domains}
    scores = {name: normalised_scores(p, reference) for name, p in ppl.items()}
    avg = scores[AVERAGING]
    gap = {"per_domain": {d: _gap(scores[MOE]["per_domain"][d], avg["per_domain"][d]) for d in domains},
           "average": _gap(scores[MOE]["average"], avg["average"])}
    shares = count.shares()
    own = routing_accuracy(shares, {d: list(experts).index(d) for d in domains})
    report = {"moe": str(moe_dir), "domains": domains, "experts": {d: str(p) for d, p in experts.items()},
              "documents": {d: len(texts[d]) for d in domains}, "blocks": {d: len(blocks[d][0]) for d in domains},
              "seq_len": seq_len, "results": results, "normalised": scores, "gap_closed": gap,
              "routing_shares": shares, "own_expert_share": {d: sum(v) / len(v) for d, v in own.items()},
              "cost": {"models": n_models, "block_forward_passes": n_models * len(ids),
                       "tokens_per_model": int(mask.sum()), "seconds": seconds},
              "settings": {"batch_size": batch_size, "device": str(device), "dtype": str(dtype), "seed": seed,
                           "random_routing": random_routing, "averaging_kept": str(keep_averaging or "")}}
    if write:
        write_report(moe_dir, report, list(experts))
    return report


def _gap(score: float, averaging: float):
    """Gap closed towards 100 (the own expert); None where averaging is already as good as the expert."""
    from dume.train.perplexity import gap_closed

    return gap_closed(score, averaging, 100.0) if averaging < 100.0 else None


def _averaging_nll(es, moe_dir: Path, keep, ids, mask, owner, domains, run):
    """Model averaging's NLL: the average built streamed (`dume.moe.merge.average_experts`) into `keep`, or into a
    hidden temporary folder beside the MoE that is removed after."""
    import shutil
    import tempfile

    from dume.moe.merge import average_experts

    if keep is not None:
        return _domain_nll(average_experts(es.dirs, Path(keep)), ids, mask, owner, domains, **run)
    tmp = Path(tempfile.mkdtemp(prefix=f".{moe_dir.name}.averaging-", dir=moe_dir.parent))
    try:
        return _domain_nll(average_experts(es.dirs, tmp / "model"), ids, mask, owner, domains, **run)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def card_section(report: dict) -> str:
    """The model card's evaluation section (markdown), from the report alone."""
    domains, ppl, scores = report["domains"], report["results"], report["normalised"]
    rows = [MOE] + [f"{d}_expert" for d in report["experts"]] + [AVERAGING] + ([RANDOM] if RANDOM in ppl else [])
    docs = ", ".join(f"{d}: {n}" for d, n in report["documents"].items())
    lines = [CARD_BEGIN, "## Evaluation (`dume eval`)", "",
             f"Perplexity on each domain's evaluation documents ({docs}; "
             f"packed into {report['seq_len']}-token blocks) and, in brackets, the normalised score 100·p̂/p "
             "(p̂ = the domain's own expert; 100 = as good as the specialist).", "",
             "| model | " + " | ".join(domains) + " | normalised avg |", "|---|" + "---:|" * (len(domains) + 1)]
    for name in rows:
        cells = [f"{ppl[name][d]['perplexity']:.3f} ({scores[name]['per_domain'][d]:.1f})" for d in domains]
        bold = "**" if name == MOE else ""
        avg = f"{bold}{scores[name]['average']:.1f}{bold}"
        lines.append(f"| {bold}{name}{bold} | " + " | ".join(cells) + f" | {avg} |")
    gap = report["gap_closed"]
    fmt = lambda v: "—" if v is None else f"{v:.0f} %"  # noqa: E731
    lines += ["", "Gap closed, the share of the distance from model averaging to each domain's own expert that the "
              f"MoE covers: {', '.join(f'{d} {fmt(v)}' for d, v in gap['per_domain'].items())}; on the average score "
              f"{fmt(gap['average'])}.", "",
              "Share of each domain's tokens routed to its own expert (top-1, mean over layers): "
              + ", ".join(f"{d} {v:.1%}" for d, v in report["own_expert_share"].items())
              + f"; per layer in `{HEATMAP_FILE}`.", "",
              f"Cost: {report['cost']['models']} models × {sum(report['blocks'].values())} blocks "
              f"({report['cost']['tokens_per_model']} tokens each), {sum(report['cost']['seconds'].values()):.0f} s.",
              CARD_END]
    return "\n".join(lines)


def with_card_section(card: str, section: str) -> str:
    """`card` with its evaluation section replaced by `section` (added at the end when it has none)."""
    if CARD_BEGIN in card and CARD_END in card:
        head, rest = card.split(CARD_BEGIN, 1)
        return head + section + rest.split(CARD_END, 1)[1]
    return (card.rstrip("\n") + "\n\n" if card.strip() else "") + section + "\n"


def routing_heatmap(report: dict, expert_names: list[str], path: Path) -> Path:
    """One panel per domain: layers (rows) × experts (columns), the share of the domain's tokens whose top-1 expert
    each one is. A diagonal-looking row of panels (each domain lit on its own expert) is a router that separates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dume.checkpoint.io import tmp_sibling

    shares, domains = report["routing_shares"], report["domains"]
    layers = len(next(iter(shares.values())))
    fig, axes = plt.subplots(1, len(domains), figsize=(1.2 + 0.55 * len(expert_names) * len(domains),
                                                       1.5 + 0.22 * layers), squeeze=False, sharey=True)
    im = None
    for ax, d in zip(axes[0], domains):
        im = ax.imshow(shares[d], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{d} tokens", fontsize=9)
        ax.set_xticks(range(len(expert_names)))
        ax.set_xticklabels(expert_names, rotation=90, fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
    axes[0][0].set_ylabel("layer", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of tokens (top-1)")
    fig.suptitle("Where each domain's tokens go: the share whose top-1 expert each one is", fontsize=10, y=1.04)
    tmp = tmp_sibling(Path(path))
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return Path(path)


def write_report(moe_dir: Path, report: dict, expert_names: list[str]) -> None:
    """dume_eval.json, the heatmap and the card section, each written atomically into the MoE's folder."""
    from dume.checkpoint.io import atomic_write_json, atomic_write_text, read_text

    moe_dir = Path(moe_dir)
    routing_heatmap(report, expert_names, moe_dir / HEATMAP_FILE)
    atomic_write_json(moe_dir / REPORT_FILE, report)
    card = moe_dir / "README.md"
    atomic_write_text(card, with_card_section(read_text(card) if card.is_file() else "", card_section(report)))
