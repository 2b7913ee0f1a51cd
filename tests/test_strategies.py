"""`clm_moerging_strategies_eval.py` on the tiny trained run: every method's results and
saved model, DUME's statistics and gates, the oracle/forced-routing equivalence, DUME+
and BTX, and bad input refused with nothing overwritten."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

import clm_moerging_strategies_eval as strategies
from dume.routers import registry as dume_strategies
from dume.moe.edit import read_gates
from dume.stats.ridge import RidgeStats
from tests.helpers import one_error_line
from tests.fixtures import (  # noqa: F401  (pytest fixtures)
    DOMAINS,
    ROUTER_STEPS,
    base_args,
    copy_run,
    corpus_dir,
    datasets_cache,
    make_run,
    method_args,
    non_train_paragraphs,
    run_script,
    single_thread,
    snapshot,
    strategy_run,
    trained_run,
)

pytestmark = pytest.mark.usefixtures("single_thread")
ROUTED = [m for m in strategies.METHODS if m != "oracle"]
STATS_KEY = "tokens-all_steps-all"


def _result(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "results" / f"{name}.json").read_text())


def _gates_equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# =============================================================================================
# Every method
# =============================================================================================


def test_methods_are_the_tables_rows():
    """Table 2's rows (run_clm.py) are the paper's; every other registered router is a
    row of the routers study, still runnable by name."""
    assert set(strategies.PAPER_METHODS) == {"oracle", "random_routing", "centroid", "DUME", "BTX", "DUMEplus"}
    study = set(strategies.METHODS) - set(strategies.PAPER_METHODS)
    assert study == set(dume_strategies.names(paper=False)) and study


@pytest.mark.parametrize("method", strategies.METHODS)
def test_result_file(strategy_run, method):
    res = _result(strategy_run, method)
    assert res["method"] == method
    assert res["domains"] == list(DOMAINS)
    assert set(res["results"]) == set(DOMAINS)
    for r in res["results"].values():
        assert r["perplexity"] > 1 and r["tokens"] > 0
    if method == "oracle":
        return
    L = AutoConfig.from_pretrained(strategy_run / "seed").num_hidden_layers
    shares, accuracy = res["routing_shares"], res["routing_accuracy"]
    assert set(shares) == set(accuracy) == set(DOMAINS)
    for i, d in enumerate(DOMAINS):
        assert len(shares[d]) == L
        for layer in range(L):
            assert len(shares[d][layer]) == len(DOMAINS)
            assert all(0.0 <= v <= 1.0 for v in shares[d][layer])
            assert sum(shares[d][layer]) == pytest.approx(1.0, abs=1e-9)
            assert accuracy[d][layer] == shares[d][layer][i]


def test_routing_shares_count_real_tokens_only(strategy_run, corpus_dir):
    """Shares of a right-padded batch = the token-weighted shares of its rows' real parts."""
    from dume.moe.routing import routing_shares

    moe = AutoModelForCausalLM.from_pretrained(strategy_run / "models" / "DUME").eval()
    ids, _ = make_run(strategy_run, corpus_dir).blocks("math", "test")
    full, short = ids[0:1], ids[1:2, :9]
    padded = torch.cat([full, torch.cat([short, torch.zeros(1, ids.shape[1] - 9, dtype=ids.dtype)], 1)])
    mask = torch.cat([torch.ones_like(full), (torch.arange(ids.shape[1]) < 9).long()[None]])
    got = torch.tensor(routing_shares(moe, {"d": (padded, mask)})["d"])
    a = torch.tensor(routing_shares(moe, {"d": (full, torch.ones_like(full))})["d"])
    b = torch.tensor(routing_shares(moe, {"d": (short, torch.ones_like(short))})["d"])
    n_a, n_b = full.numel(), short.numel()
    torch.testing.assert_close(got, (a * n_a + b * n_b) / (n_a + n_b), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", strategies.METHODS)
def test_saved_model_loads_with_plain_transformers_and_reproduces_perplexity(strategy_run, corpus_dir, method):
    from dume.train.perplexity import perplexity

    run = make_run(strategy_run, corpus_dir)
    res = _result(strategy_run, method)
    for d in DOMAINS:
        if method == "oracle":
            model = AutoModelForCausalLM.from_pretrained(strategy_run / "models" / "oracle" / d)
            assert type(model) is LlamaForCausalLM
        else:
            model = AutoModelForCausalLM.from_pretrained(strategy_run / "models" / method)
            if dume_strategies.REGISTRY[method].stock_checkpoint:
                assert type(model) is MixtralForCausalLM
            else:  # the context-routed research rows: dume's registered subclass (dume.moe.context_moe)
                assert type(model).__name__ == "ContextMixtralForCausalLM" and isinstance(model, MixtralForCausalLM)
            assert model.config.num_local_experts == len(DOMAINS)
        ids, mask = run.blocks(d, "test")
        got = perplexity(model, ids, mask, batch_size=32)
        assert got["tokens"] == res["results"][d]["tokens"]
        assert got["perplexity"] == pytest.approx(res["results"][d]["perplexity"], rel=1e-5)


def test_k_per_method(strategy_run):
    for method in ROUTED:
        k = AutoConfig.from_pretrained(strategy_run / "models" / method).num_experts_per_tok
        assert k == (2 if method == "BTX" else 1), method
    assert _result(strategy_run, "BTX")["settings"]["k"] == 2


# =============================================================================================
# DUME's statistics and gates
# =============================================================================================


def test_dume_stats_resolve_to_the_saved_gates(strategy_run):
    from dume.checkpoint.experts import shared_weights_fingerprint
    from dume.routers.closed_form import centroid_gates, dume_gates

    res = _result(strategy_run, "DUME")
    lam, temp = res["settings"]["lam"], res["settings"]["temp"]
    assert (lam, temp) == (0.01, 1.0)
    stats = RidgeStats.load(strategy_run / "models" / "DUME" / "dume_stats")
    assert stats.domains == list(DOMAINS)
    assert stats.meta["model_fingerprint"] == shared_weights_fingerprint(strategy_run / "models" / "DUME")
    assert stats.num_dume_tokens is None
    counts = stats.token_counts()
    assert res["token_counts"] == counts
    assert all(c[0] > 0 and len(set(c)) == 1 for c in counts.values())  # every layer saw every token

    saved = read_gates(strategy_run / "models" / "DUME")
    assert _gates_equal(dume_gates(stats, lam, temp), saved)
    assert not _gates_equal(dume_gates(stats, lam * 1e4, temp), saved)  # the check can tell λ apart
    # The centroid baseline comes from the same statistics.
    centroid = RidgeStats.load(strategy_run / "models" / "centroid" / "dume_stats")
    assert _gates_equal(centroid_gates(centroid, temp), read_gates(strategy_run / "models" / "centroid"))


def test_random_routing_gates_are_the_seeded_random_gates(strategy_run):
    from dume.routers.closed_form import random_gates

    cfg = AutoConfig.from_pretrained(strategy_run / "models" / "random_routing")
    expected = random_gates(cfg.num_hidden_layers, len(DOMAINS), cfg.hidden_size, seed=0)
    assert _gates_equal(read_gates(strategy_run / "models" / "random_routing"), expected)


def test_temperature_and_lambda_reuse_the_cached_statistics(strategy_run, corpus_dir, capsys, monkeypatch):
    import dume.stats.oracle
    from dume.routers.closed_form import dume_gates

    monkeypatch.setattr(dume.stats.oracle, "collect_domain", lambda *a, **k: pytest.fail("recollected statistics"))
    capsys.readouterr()
    strategies.main(method_args(strategy_run, corpus_dir, "DUME", "--temp", "0.5", "--lambda", "3",
                                "--tag", "sweep"))
    assert "using cached statistics" in capsys.readouterr().out
    stats = RidgeStats.load(strategy_run / "stats" / STATS_KEY)
    gates = read_gates(strategy_run / "models" / "DUME_sweep")
    assert _gates_equal(gates, dume_gates(stats, 3.0, 0.5))
    at_t1 = dume_gates(stats, 3.0, 1.0)
    for g, g1 in zip(gates, at_t1):  # the temperature folds into the weights: W / T
        torch.testing.assert_close(g, 2 * g1)
    res = _result(strategy_run, "DUME_sweep")
    assert res["method"] == "DUME" and res["settings"]["temp"] == 0.5 and res["settings"]["lam"] == 3.0


def test_a_tagged_sweep_does_not_replace_the_method_row(tmp_path, strategy_run, corpus_dir):
    import clm_experts_eval
    from dume.report.clm_table import write_clm_table

    run_dir = copy_run(strategy_run, tmp_path / "run")
    clm_experts_eval.main(base_args(run_dir, corpus_dir))  # skipped if it already exists
    strategies.main(method_args(run_dir, corpus_dir, "DUME", "--k", "2", "--tag", "hot"))
    write_clm_table(run_dir)
    table = json.loads((run_dir / "clm_results.json").read_text())
    default = {d: r["perplexity"] for d, r in _result(run_dir, "DUME")["results"].items()}
    hot = {d: r["perplexity"] for d, r in _result(run_dir, "DUME_hot")["results"].items()}
    assert default != hot
    assert table["methods"]["DUME"]["perplexity"] == default
    assert "DUME_hot" not in table["methods"]  # a tagged sweep point is not a Table 2 row


def _force_expert(model, expert: int) -> None:
    """Route every token of every Mixtral layer to `expert` with weight 1."""
    D = model.config.num_local_experts

    def forward(hidden_states):
        n = hidden_states.reshape(-1, model.config.hidden_size).shape[0]
        logits = torch.zeros(n, D, dtype=hidden_states.dtype)
        return logits, torch.ones(n, 1), torch.full((n, 1), expert, dtype=torch.long)

    for layer in model.model.layers:
        layer.mlp.gate.forward = forward


@torch.no_grad()
def test_oracle_equals_dume_with_forced_routing(strategy_run, corpus_dir):
    run = make_run(strategy_run, corpus_dir)
    moe = AutoModelForCausalLM.from_pretrained(strategy_run / "models" / "DUME").eval()
    differs_when_not_forced = []
    for i, d in enumerate(DOMAINS):
        oracle = AutoModelForCausalLM.from_pretrained(strategy_run / "models" / "oracle" / d).eval()
        ids, mask = (t[:4] for t in run.blocks(d, "test"))
        expected = oracle(input_ids=ids, attention_mask=mask).logits
        free = moe(input_ids=ids, attention_mask=mask).logits
        differs_when_not_forced.append(not torch.allclose(free, expected, atol=1e-4))
        forced = AutoModelForCausalLM.from_pretrained(strategy_run / "models" / "DUME").eval()
        _force_expert(forced, i)
        torch.testing.assert_close(forced(input_ids=ids, attention_mask=mask).logits, expected,
                                   rtol=1e-5, atol=1e-5)
    assert any(differs_when_not_forced), "DUME's own routing should not equal every oracle"


# =============================================================================================
# BTX and DUME+
# =============================================================================================


def test_dumeplus_is_dume_trained_a_little(strategy_run):
    dume = read_gates(strategy_run / "models" / "DUME")
    plus = read_gates(strategy_run / "models" / "DUMEplus")
    diff = max(float((a - b).abs().max()) for a, b in zip(dume, plus))
    lr = _result(strategy_run, "DUMEplus")["settings"]["lr"]
    assert lr == 1e-5
    assert 0 < diff < 10 * lr * ROUTER_STEPS, diff  # Adam moves each entry by about lr per step
    history = _result(strategy_run, "DUMEplus")["history"]
    assert history["steps_done"] == ROUTER_STEPS and len(history["train_loss"]) == ROUTER_STEPS
    assert history["straight_through_top1"] is True  # k = 1: trained through the straight-through router
    assert history["val"] and history["config"]["lr"] == lr


def test_btx_trains_random_top2_routers(strategy_run):
    from dume.routers.closed_form import random_gates

    res = _result(strategy_run, "BTX")
    assert res["settings"]["lr"] == 1e-4
    assert res["history"]["steps_done"] == ROUTER_STEPS
    assert res["history"]["straight_through_top1"] is False
    cfg = AutoConfig.from_pretrained(strategy_run / "models" / "BTX")
    assert cfg.num_experts_per_tok == 2
    start = random_gates(cfg.num_hidden_layers, len(DOMAINS), cfg.hidden_size, seed=0)
    trained = read_gates(strategy_run / "models" / "BTX")
    diff = max(float((a - b).abs().max()) for a, b in zip(start, trained))
    assert 0 < diff < 10 * 1e-4 * ROUTER_STEPS


# =============================================================================================
# Bad input
# =============================================================================================


def _expect_error(capsys, argv, *needles) -> str:
    capsys.readouterr()
    return one_error_line(capsys, run_script(strategies.main, argv), *needles)


@pytest.mark.parametrize("method, flags, needle", [
    ("DUME", ["--lambda", "0"], "--lambda"),
    ("DUME", ["--lambda", "-1"], "--lambda"),
    ("DUME", ["--k", "0"], "--k 0"),
    ("random_routing", ["--k", "4"], "--k 4"),
    ("DUME", ["--temp", "0"], "--temp"),
    ("centroid", ["--temp", "-1"], "--temp"),
    ("DUMEplus", ["--domains", "code,nosuch"], "'nosuch'"),
])
def test_bad_flags_are_refused_and_nothing_is_overwritten(strategy_run, corpus_dir, capsys, method, flags,
                                                          needle):
    before = snapshot(strategy_run)
    _expect_error(capsys, method_args(strategy_run, corpus_dir, method, *flags, "--redo"), needle)
    assert snapshot(strategy_run) == before


def _save_llama(path: Path, tokenizer_dir: Path, **config) -> None:
    base = LlamaConfig.from_pretrained(tokenizer_dir.parent / "seed")
    fields = {k: v for k, v in base.to_dict().items() if k != "head_dim"}
    cfg = LlamaConfig(**{**fields, **config})
    LlamaForCausalLM(cfg).save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, path / f.name)


@pytest.mark.parametrize("method", ["DUME", "oracle"])
def test_mismatched_experts_are_refused(tmp_path, strategy_run, corpus_dir, capsys, method):
    run_dir = copy_run(strategy_run, tmp_path / "run")
    shutil.rmtree(run_dir / "experts" / "math")
    _save_llama(run_dir / "experts" / "math", run_dir / "tokenizer", hidden_size=64, intermediate_size=128)
    before = snapshot(run_dir)
    _expect_error(capsys, method_args(run_dir, corpus_dir, method, "--redo"), str(run_dir / "experts" / "math"),
                  "hidden_size")
    assert snapshot(run_dir) == before


def test_cached_statistics_of_another_model_are_recollected(tmp_path, strategy_run, corpus_dir, capsys):
    run_dir = copy_run(strategy_run, tmp_path / "run")
    cache = run_dir / "stats" / STATS_KEY
    good = RidgeStats.load(cache)
    stale = RidgeStats.load(cache)
    stale.model_fingerprint = "0123456789abcdef"
    stale.A = stale.A * 7 + torch.eye(stale.hidden_size, dtype=torch.float64)
    stale.s = stale.s.flip(-1)
    stale.save(cache)
    with pytest.raises(Exception, match="different models"):
        good.merge(stale)

    capsys.readouterr()
    strategies.main(method_args(run_dir, corpus_dir, "DUME", "--tag", "fresh"))
    out = capsys.readouterr().out
    assert "differ in shared weights" in out and "using cached statistics" not in out
    assert _gates_equal(read_gates(run_dir / "models" / "DUME_fresh"), read_gates(run_dir / "models" / "DUME"))
    recollected = RidgeStats.load(cache)
    assert recollected.model_fingerprint == good.model_fingerprint
    torch.testing.assert_close(recollected.A, good.A, rtol=0, atol=0)


def test_cached_statistics_of_another_seq_len_are_not_reused(tmp_path, strategy_run, corpus_dir, capsys):
    run_dir = copy_run(strategy_run, tmp_path / "run")
    capsys.readouterr()
    strategies.main(method_args(run_dir, corpus_dir, "DUME", "--seq-len", "8", "--tag", "short"))
    assert "using cached statistics" not in capsys.readouterr().out
    short = RidgeStats.load(run_dir / "models" / "DUME_short" / "dume_stats")
    full = RidgeStats.load(run_dir / "models" / "DUME" / "dume_stats")
    assert all(s[0] < f[0] for s, f in zip(short.token_counts().values(), full.token_counts().values()))


def test_domain_subsets_get_their_own_experts(tmp_path, strategy_run, corpus_dir):
    from dume.checkpoint.reader import CheckpointReader

    run_dir = copy_run(strategy_run, tmp_path / "run")
    strategies.main(method_args(run_dir, corpus_dir, "random_routing", "--domains", "code,math", "--tag", "cm"))
    strategies.main(method_args(run_dir, corpus_dir, "random_routing", "--domains", "code,history", "--tag", "ch"))
    for tag, domains in (("cm", ("code", "math")), ("ch", ("code", "history"))):
        with CheckpointReader(run_dir / "models" / f"random_routing_{tag}") as moe:
            for e, d in enumerate(domains):
                with CheckpointReader(run_dir / "experts" / d) as expert:
                    assert torch.equal(moe.get(f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"),
                                       expert.get("model.layers.0.mlp.gate_proj.weight")), (tag, d)


def test_domain_without_training_text_is_refused(tmp_path, strategy_run, corpus_dir, capsys):
    run_dir = copy_run(strategy_run, tmp_path / "run")
    data_dir = tmp_path / "data"
    shutil.copytree(corpus_dir, data_dir)
    (data_dir / "zoo.txt").write_text("\n\n".join(non_train_paragraphs(6)) + "\n")
    shutil.copytree(run_dir / "experts" / "code", run_dir / "experts" / "zoo")
    before = snapshot(run_dir)
    _expect_error(capsys, method_args(run_dir, data_dir, "DUME", "--domains", "code,math,zoo", "--tag", "zoo"),
                  "'zoo'", "train", "no documents")
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k in before} == before, "existing outputs were changed"
    assert not (run_dir / "results" / "DUME_zoo.json").exists()
    assert not (run_dir / "models" / "DUME_zoo").exists()


def test_saved_dume_model_equals_a_handwritten_routed_forward(strategy_run):
    """The DUME checkpoint, loaded with plain from_pretrained, computes top-1 routing with
    the gates solved from its statistics over the experts' own MLPs."""
    from dume.routers.closed_form import dume_gates
    from tests.test_merge import reference_moe

    res = _result(strategy_run, "DUME")
    stats = RidgeStats.load(strategy_run / "models" / "DUME" / "dume_stats")
    gates = [g.float() for g in dume_gates(stats, res["settings"]["lam"], res["settings"]["temp"])]
    moe = AutoModelForCausalLM.from_pretrained(strategy_run / "models" / "DUME").eval()
    assert isinstance(moe, MixtralForCausalLM) and moe.config.num_experts_per_tok == 1
    ref, routed = reference_moe([strategy_run / "experts" / d for d in DOMAINS], gates, k=1)
    ids = torch.randint(0, moe.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert any(len(r.chosen) >= 2 for r in routed)  # the routing really mixes experts
