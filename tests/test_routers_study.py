"""The training-free routers of the routers study (issue 14), each checked by an
equivalence: loss-aware targets with one-hot losses are DUME; layer-sequential
statistics of a one-layer model (and layer 0 of any model) are the one-pass statistics;
balanced statistics of equal-sized domains are DUME; the weight-based gate of two
experts that differ by ±(rank one) is that direction; mergekit's hidden gate at layer 0
is the normalised mean embedding of the prompts' last tokens."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_llama, tiny_tokenizer

DOMAINS = ("law", "med", "code")
TEXTS = {
    "law": [f"The court ruled on case {i} under the statute of {i % 7}." for i in range(24)],
    "med": [f"The patient {i} received {i % 5} doses of aspirin daily." for i in range(18)],
    "code": [f"def f{i}(x): return x + {i} * {i % 3}" for i in range(30)],
}


def _experts(root, layers: int, tok):
    """Three experts from one seed model, their MLPs perturbed differently (as fine-tuning does)."""
    base = tiny_llama(seed=0, num_hidden_layers=layers)
    dirs = []
    for e, d in enumerate(DOMAINS):
        model = tiny_llama(seed=0, num_hidden_layers=layers)
        model.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(e + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".mlp." in name:
                    p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / d)
        tok.save_pretrained(root / d)
        dirs.append(root / d)
    return dirs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("study")
    tok = tiny_tokenizer()
    return {layers: _experts(root / f"L{layers}", layers, tok) for layers in (1, 2)}, tok


COMMON = dict(num_dume_tokens=None, max_len=32, batch_size=4)


def _dume(dirs, tok):
    from dume.stats.oracle import collect_statistics

    return collect_statistics(dirs, list(DOMAINS), TEXTS, tok, log=lambda *a: None, **COMMON)[0]


def test_loss_aware_targets_with_one_hot_losses_are_dume(setup, monkeypatch):
    import dume.stats.loss_aware as lt
    from dume.routers.closed_form import dume_gates

    (experts, tok) = setup
    dirs = experts[2]
    real = lt.token_losses
    calls = []

    def one_hot_losses(model, batches):
        # called for expert e = 0, 1, 2 in turn, each over the domains in order
        e, d = divmod(len(calls), len(DOMAINS))
        calls.append((e, d))
        return [torch.where(torch.isnan(t), t, 0.0 if e == d else 60.0) for t in real(model, batches)]

    monkeypatch.setattr(lt, "token_losses", one_hot_losses)
    loss_stats, counts = lt.collect_loss_aware_statistics(dirs, list(DOMAINS), TEXTS, tok, log=lambda *a: None,
                                                          **COMMON)
    dume = _dume(dirs, tok)
    assert len(calls) == 9
    assert torch.equal(loss_stats.A, dume.A) and torch.equal(loss_stats.n, dume.n)
    assert torch.allclose(loss_stats.s, dume.s, rtol=1e-5, atol=1e-5)
    for a, b in zip(dume_gates(loss_stats, 0.01), dume_gates(dume, 0.01)):
        assert (a - b).abs().max().item() < 1e-5


def test_loss_aware_targets_with_real_losses_are_a_distribution_and_move_the_router(setup):
    from dume.stats.loss_aware import collect_loss_aware_statistics, soft_targets
    from dume.routers.closed_form import dume_gates

    (experts, tok) = setup
    losses = torch.tensor([[[1.0, float("nan")]], [[2.0, float("nan")]], [[0.5, float("nan")]]])  # [D, B, T]
    y = soft_targets(losses, 1, tau=1.0)
    assert torch.allclose(y.sum(-1), torch.ones(1, 2, dtype=torch.float64))
    assert y[0, 1].tolist() == [0.0, 1.0, 0.0]  # no next token: the domain's own target
    assert y[0, 0].argmax().item() == 2
    dirs = experts[2]
    stats, _ = collect_loss_aware_statistics(dirs, list(DOMAINS), TEXTS, tok, log=lambda *a: None, **COMMON)
    dume = _dume(dirs, tok)
    # every token's targets sum to one, so the target sums add up to the feature sums
    assert torch.allclose(stats.s.sum(dim=1), dume.s.sum(dim=1), rtol=1e-5, atol=1e-4)
    diff = max((a - b).abs().max().item() for a, b in zip(dume_gates(stats, 0.01), dume_gates(dume, 0.01)))
    assert diff > 1e-3


def _sequential(dirs, tok, tmp_path):
    from dume.moe.merge import moerge_experts
    from dume.routers.closed_form import layer_solver
    from dume.stats.sequential import collect_sequential_statistics

    moe = moerge_experts(dirs, tmp_path / "moe")
    return collect_sequential_statistics(moe, list(DOMAINS), TEXTS, tok, solve_layer=layer_solver(0.01),
                                         log=lambda *a: None, **COMMON)[0]


def test_sequential_statistics_of_one_layer_are_the_one_pass_statistics(setup, tmp_path):
    (experts, tok) = setup
    seq, one = _sequential(experts[1], tok, tmp_path), _dume(experts[1], tok)
    assert torch.equal(seq.n, one.n)
    assert torch.allclose(seq.A, one.A, rtol=1e-5, atol=1e-4) and torch.allclose(seq.s, one.s, rtol=1e-5, atol=1e-4)


def test_sequential_statistics_route_the_earlier_layers(setup, tmp_path):
    """Layer 1's sequential statistics = the inputs of layer 1 of the saved MoE whose layer-0
    router is DUME's (from the one-pass layer-0 statistics), read by plain hooks."""
    from transformers import AutoModelForCausalLM

    from dume.stats.capture import MLPInputCapture, token_mask
    from dume.text.batches import document_batches
    from dume.moe.merge import moerge_experts
    from dume.stats.ridge import RidgeStats
    from dume.routers.closed_form import dume_gates

    (experts, tok) = setup
    seq, one = _sequential(experts[2], tok, tmp_path), _dume(experts[2], tok)
    assert torch.allclose(seq.A[0], one.A[0], rtol=1e-5, atol=1e-4)  # layer 0 sees no MLP
    gate0 = dume_gates(one, 0.01)[0]
    ref_dir = moerge_experts(experts[2], tmp_path / "ref", gates=[gate0, torch.zeros(3, 32)])
    model = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32).eval()
    ref = RidgeStats(2, 32, DOMAINS)
    with MLPInputCapture(model) as cap, torch.no_grad():
        for d in DOMAINS:
            for ids, mask in document_batches(TEXTS[d], tok, COMMON["max_len"], COMMON["batch_size"]):
                model(input_ids=ids, attention_mask=mask)
                ref.update(1, d, cap.features[1], token_mask(mask, None))
    assert torch.allclose(seq.A[1], ref.A[1], rtol=1e-5, atol=1e-4)
    assert torch.allclose(seq.s[1], ref.s[1], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(seq.A[1], one.A[1], rtol=1e-3, atol=1e-2)  # routing, not the oracles


def test_balanced_statistics_of_equal_domains_are_dume(setup):
    from dume.routers import registry as strategies
    from dume.routers.closed_form import dume_gates

    (experts, tok) = setup
    dume = _dume(experts[2], tok)
    ctx = strategies.GateContext(num_layers=2, num_experts=3, hidden_size=32)
    equal = dume.select(DOMAINS)
    equal.n[:] = 100  # equal token counts: every weight is 1
    for a, b in zip(strategies.make_gates("DUME_balanced", equal, ctx), dume_gates(dume, 0.01)):
        assert torch.equal(a, b)
    # unequal counts: balanced = DUME on statistics scaled by mean(n)/n_d
    counts = dume.n[0].double()
    scaled = dume
    for j, d in enumerate(DOMAINS):
        scaled = scaled.scale_domain(d, float(counts.mean() / counts[j]))
    for a, b in zip(strategies.make_gates("DUME_balanced", dume, ctx), dume_gates(scaled, 0.01)):
        assert torch.equal(a, b)
    assert len(set(counts.tolist())) == 3  # the domains do differ in size here


def test_weight_gate_of_two_experts_is_their_difference_direction(tmp_path):
    from dume.routers.weights import weight_gates

    base = tiny_llama(seed=3, num_hidden_layers=1)
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(128, generator=g), torch.randn(32, generator=g)  # [2I] and [H]: gate+up rows, inputs
    dirs = []
    for e, sign in enumerate((1.0, -1.0)):
        model = tiny_llama(seed=3, num_hidden_layers=1)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            model.model.layers[0].mlp.gate_proj.weight.add_(sign * torch.outer(u[:64], v))
            model.model.layers[0].mlp.up_proj.weight.add_(sign * torch.outer(u[64:], v))
        model.save_pretrained(tmp_path / f"e{e}")
        dirs.append(tmp_path / f"e{e}")
    gates = weight_gates(dirs, temperature=2.0)[0]
    direction = v / v.norm() * (1.0 if u[:64].sum() > 0 else -1.0)  # the gate projection opens along +direction
    assert torch.allclose(gates[0], direction / 2.0, atol=1e-5)
    assert torch.allclose(gates[1], -direction / 2.0, atol=1e-5)


def test_mergekit_hidden_gate_at_layer_zero_is_the_mean_last_token_embedding(setup, tmp_path):
    from dume.routers.prompt_hidden import prompt_hidden_gates

    (experts, tok) = setup
    base = tiny_llama(seed=0, num_hidden_layers=2)
    base.save_pretrained(tmp_path / "base")
    prompts = {d: TEXTS[d][:3] for d in DOMAINS}
    gates = prompt_hidden_gates(tmp_path / "base", tok, prompts, list(DOMAINS))
    emb = base.model.embed_tokens.weight.detach().double()
    for e, d in enumerate(DOMAINS):
        last = [tok(p, add_special_tokens=False).input_ids[-1] for p in prompts[d]]
        mean = emb[last].mean(dim=0)
        assert torch.allclose(gates[0][e].double(), mean / mean.norm(), atol=1e-6)
    assert not torch.allclose(gates[1], gates[0])  # later layers see the residual stream, not the embeddings


def test_context_routing_is_the_stock_router_on_prefix_mean_inputs(setup, tmp_path):
    """The registered subclass equals a stock Mixtral whose routers are fed the running
    mean of their inputs (the logits are linear in x), loads through AutoModelForCausalLM
    without remote code, and routes the first token exactly like the stock model."""
    import shutil

    from transformers import AutoModelForCausalLM

    import dume.moe.context_moe as cm
    from dume.moe.merge import moerge_experts

    (experts, tok) = setup
    g = torch.Generator().manual_seed(0)
    moe = moerge_experts(experts[2], tmp_path / "moe", gates=[torch.randn(3, 32, generator=g) for _ in range(2)])
    shutil.copytree(moe, tmp_path / "ctx")
    cm.make_context_moe(tmp_path / "ctx")
    ctx = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ctx")).eval()
    assert type(ctx).__name__ == "ContextMixtralForCausalLM" and ctx.config.model_type == cm.MODEL_TYPE
    stock = AutoModelForCausalLM.from_pretrained(str(moe)).eval()
    ids = torch.randint(0, 300, (2, 24), generator=g)

    def prefix_mean(module, args):
        x = args[0].view(ids.shape[0], ids.shape[1], -1)
        steps = torch.arange(1, ids.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        return (x.cumsum(dim=1) / steps).reshape(-1, x.shape[-1])

    with torch.no_grad():
        plain = stock(ids).logits
        hooks = [layer.mlp.gate.register_forward_pre_hook(prefix_mean) for layer in stock.model.layers]
        try:
            reference = stock(ids).logits
        finally:
            for h in hooks:
                h.remove()
        got = ctx(ids).logits
    assert (got - reference).abs().max().item() < 1e-4
    assert (got[:, 0] - plain[:, 0]).abs().max().item() < 1e-5
    assert (got - plain).abs().max().item() > 1e-3


def test_verdict_needs_a_stock_router_that_beats_dume_on_every_seed_of_every_set():
    from dume.report.routers_study import gap_closed, verdict

    assert gap_closed(85.0, 80.0, 90.0) == 50.0
    with pytest.raises(Exception, match="no gap"):
        gap_closed(85.0, 90.0, 90.0)

    def summary(rows):
        return {"rows": {n: {"per_seed_average": dict(enumerate(v)), "average": {"mean": sum(v) / len(v)}}
                         for n, v in rows.items()}}

    one = {"DUME": [80, 81, 82], "DUME_balanced": [81, 82, 83], "DUME_context": [90, 90, 90],
           "centroid": [85, 80, 85]}
    two = {"DUME": [70, 70, 70], "DUME_balanced": [71, 70.5, 72], "DUME_context": [90, 90, 90],
           "centroid": [75, 75, 75]}
    decision = verdict({"a": summary(one), "b": summary(two)})
    assert decision == {"default": "DUME_balanced", "winners": ["DUME_balanced"]}  # context: not a stock checkpoint
    two["DUME_balanced"][1] = 69.9  # loses one seed of one set
    assert verdict({"a": summary(one), "b": summary(two)}) == {"default": "DUME", "winners": []}


def test_balancing_loss_aware_statistics_reweights_each_domains_tokens_in_every_column(setup, tmp_path):
    """Loss-aware target sums are kept per data domain, so balancing weights domain d's
    tokens in every expert's column (not the expert's column as a whole, which the column
    normalisation would undo); they survive save/load, and subsets keep both axes."""
    from dume.stats.loss_aware import collect_loss_aware_statistics
    from dume.stats.ridge import RidgeStats

    (experts, tok) = setup
    stats, _ = collect_loss_aware_statistics(experts[2], list(DOMAINS), TEXTS, tok, log=lambda *a: None, **COMMON)
    assert torch.allclose(stats.targets.sum(dim=1), stats.s)
    w = {"law": 2.0, "med": 0.5, "code": 1.0}
    scaled = stats.scale_domains(w)
    want = torch.einsum("d,ldeh->leh", torch.tensor([w[d] for d in DOMAINS], dtype=torch.float64), stats.targets)
    assert torch.allclose(scaled.s, want)
    assert torch.equal(scaled.A[:, 0], stats.A[:, 0] * 2.0)
    stats.save(tmp_path / "loss")
    back = RidgeStats.load(tmp_path / "loss")
    assert torch.equal(back.targets, stats.targets) and torch.equal(back.s, stats.s)
    sub = stats.select(["code", "law"])
    assert torch.equal(sub.targets, stats.targets[:, [2, 0]][:, :, [2, 0]])
    with pytest.raises(Exception, match="cannot be merged"):
        stats.merge(stats)
