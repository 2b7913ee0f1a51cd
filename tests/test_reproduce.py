"""`reproduce_clm.py --smoke` on the tiny local corpus: several seeds from one shared seed
model, Table 2 aggregated over seeds (mean ± sample std), the Figure 2 sweeps kept out of
Table 2, valid PNG figures, RESULTS.md with the paper's numbers, and a rerun that redoes
nothing."""

from __future__ import annotations

import json
import math

import pytest

import reproduce_clm
from dume.report import paper
from dume.report.multiseed import aggregate_points, aggregate_tables, mean_std, seed_table, table2_names
from dume.report.clm_table import build_clm_table
from tests.fixtures import (  # noqa: F401  (pytest fixtures)
    DOMAINS,
    MAX_EVAL_BLOCKS,
    SEQ_LEN,
    VOCAB_SIZE,
    corpus_dir,
    datasets_cache,
    run_script,
    single_thread,
    snapshot,
)

pytestmark = pytest.mark.usefixtures("single_thread")
SEEDS = (0, 1)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("table2_bars", "routing_heatmap", "sweep_tokens", "sweep_k", "sweep_lambda")

_ROOT: dict = {}


def _argv(root, corpus):
    return ["--run-root", str(root), "--seeds", ",".join(map(str, SEEDS)), "--smoke",
            "--source", "local", "--data-dir", str(corpus), "--seq-len", str(SEQ_LEN),
            "--vocab-size", str(VOCAB_SIZE), "--batch-size", "8", "--max-eval-blocks", str(MAX_EVAL_BLOCKS)]


@pytest.fixture
def repro_root(tmp_path_factory, corpus_dir):
    if "root" not in _ROOT:
        root = tmp_path_factory.mktemp("repro") / "root"
        assert run_script(reproduce_clm.main, _argv(root, corpus_dir)) == 0
        _ROOT["root"] = root
    return _ROOT["root"]


# ---- aggregation, by hand --------------------------------------------------------------------

def test_mean_std_is_the_sample_std():
    got = mean_std([1.0, 2.0, 6.0])
    assert got["mean"] == pytest.approx(3.0)
    assert got["std"] == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}


def test_aggregate_tables_by_hand():
    def table(a, b):
        return {"domains": ["x", "y"], "methods": {"DUME": {
            "normalised": {"x": a, "y": b}, "average": (a + b) / 2, "perplexity": {"x": 1.0, "y": 2.0}}}}

    agg = aggregate_tables([table(80.0, 90.0), table(84.0, 96.0), table(82.0, 93.0)])
    m = agg["methods"]["DUME"]
    assert agg["seeds"] == 3
    assert m["per_domain"]["x"]["mean"] == pytest.approx(82.0)
    assert m["per_domain"]["x"]["std"] == pytest.approx(2.0)  # deviations -2, 2, 0 -> sqrt(8/2)
    assert m["per_domain"]["y"]["mean"] == pytest.approx(93.0)
    assert m["per_domain"]["y"]["std"] == pytest.approx(3.0)
    assert m["average"]["mean"] == pytest.approx(87.5)
    assert m["average"]["std"] == pytest.approx(2.5)  # averages 85, 90, 87.5
    assert aggregate_points([{1: 10.0, 2: 20.0}, {1: 14.0}]) == {
        1: {"mean": 12.0, "std": pytest.approx(math.sqrt(8)), "n": 2}, 2: {"mean": 20.0, "std": 0.0, "n": 1}}


def test_aggregation_matches_the_seed_runs(repro_root):
    """results.json's Table 2 = mean ± std of the per-seed normalised scores, by hand."""
    got = json.loads((repro_root / "results.json").read_text())["table2"]
    per_seed = [build_clm_table(repro_root / f"seed{s}") for s in SEEDS]
    for name in ("DUME", "BTX", "oracle", "model_averaging"):
        for d in DOMAINS:
            vals = [100 * t["reference_perplexity"][d] / t["methods"][name]["perplexity"][d] for t in per_seed]
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
            assert got["methods"][name]["per_domain"][d]["mean"] == pytest.approx(mean, rel=1e-12)
            assert got["methods"][name]["per_domain"][d]["std"] == pytest.approx(std, rel=1e-9, abs=1e-12)


# ---- the run ----------------------------------------------------------------------------------

def test_layout_one_shared_seed_model(repro_root):
    for s in SEEDS:
        d = repro_root / f"seed{s}"
        assert (d / "seed").is_symlink() and (d / "seed").resolve() == (repro_root / "shared" / "seed").resolve()
        assert (d / "tokenizer").resolve() == (repro_root / "shared" / "tokenizer").resolve()
        assert (d / "experts").is_dir() and not (d / "experts").is_symlink()
    a = (repro_root / "seed0" / "experts" / "math" / "model.safetensors").read_bytes()
    b = (repro_root / "seed1" / "experts" / "math" / "model.safetensors").read_bytes()
    assert a != b  # experts trained with different seeds


def test_sweeps_do_not_add_table2_rows(repro_root):
    sweep_results = list((repro_root / "sweeps" / "seed0" / "results").glob("*_*.json"))
    assert any("lam1e-4" in p.name for p in sweep_results) and any("tok2" in p.name for p in sweep_results)
    for s in SEEDS:
        assert not any("_tok" in p.name or "_lam" in p.name or "_k" in p.name
                       for p in (repro_root / f"seed{s}" / "results").glob("*.json"))
        names = set(build_clm_table(repro_root / f"seed{s}")["methods"])
        assert names <= table2_names(DOMAINS)
    rows = json.loads((repro_root / "results.json").read_text())["table2"]["methods"]
    assert set(rows) <= table2_names(DOMAINS)
    assert {"DUME", "DUMEplus", "BTX", "oracle", "centroid", "random_routing", "model_averaging"} <= set(rows)
    assert not any("tok" in n or "lam" in n for n in rows)


def test_seed_table_drops_tagged_results(repro_root, tmp_path):
    """Even a tagged result written into a seed's run dir stays out of Table 2."""
    import shutil

    run = tmp_path / "seed0"
    shutil.copytree(repro_root / "seed0", run, symlinks=True)
    src = json.loads((run / "results" / "DUME.json").read_text())
    (run / "results" / "DUME_lam1e3.json").write_text(json.dumps({**src, "name": "DUME_lam1e3"}))
    assert "DUME_lam1e3" in build_clm_table(run)["methods"]
    assert "DUME_lam1e3" not in seed_table(run)["methods"]


def test_sweeps_have_every_point(repro_root):
    sweeps = json.loads((repro_root / "results.json").read_text())["sweeps"]
    for m in ("DUME", "DUMEplus"):
        assert list(sweeps[m]["tokens"]) == [str(t) for t in reproduce_clm.SMOKE_TOKENS]
        assert list(sweeps[m]["k"]) == [str(k) for k in range(1, len(DOMAINS) + 1)]
        assert len(sweeps[m]["lambda"]) == len(reproduce_clm.SMOKE_LAMBDAS)
        seeds_run = 1 if m in reproduce_clm.FIRST_SEED_ONLY else len(SEEDS)
        for pts in sweeps[m].values():
            assert all(p["n"] == seeds_run for p in pts.values()), m


def test_first_seed_only_sweeps_and_btx_lr_points(repro_root):
    """DUME+'s sweep points and the BTX lr check exist for the first seed only."""
    first, other = (repro_root / "sweeps" / f"seed{s}" / "results" for s in SEEDS)
    for lr in reproduce_clm.BTX_LRS:
        name = f"BTX_{reproduce_clm.btx_tag(lr)}.json"
        assert (first / name).is_file() and not (other / name).exists()
        assert json.loads((first / name).read_text())["settings"]["lr"] == lr
    assert list(first.glob("DUMEplus_*.json")) and not list(other.glob("DUMEplus_*.json"))
    assert list(other.glob("DUME_*.json"))
    args = reproduce_clm.parse(["--seeds", "3,1", "--all-seed-sweeps"])[0]
    assert reproduce_clm.sweeps_this_seed(args, "DUMEplus", 1)
    args = reproduce_clm.parse(["--seeds", "3,1"])[0]
    assert reproduce_clm.sweeps_this_seed(args, "DUMEplus", 3) and not reproduce_clm.sweeps_this_seed(args, "DUMEplus", 1)
    assert reproduce_clm.sweeps_this_seed(args, "DUME", 1)


def test_oracle_ablation_of_all_non_mlp_is_the_oracle(repro_root):
    """Averaging every non-MLP group inside expert d is the oracle for d: the ablation's
    `non-MLP` score equals the oracle's Table 2 score, computed by another code path."""
    from dume.report.diagnostics import ablation_path

    for s in SEEDS:
        table = seed_table(repro_root / f"seed{s}")
        ablation = json.loads(ablation_path(repro_root / f"seed{s}").read_text())["ablation"]
        for d in DOMAINS:
            oracle = table["methods"]["oracle"]["normalised"][d]
            assert ablation["per_domain"][d]["non-MLP"] == pytest.approx(oracle, rel=1e-5), (s, d)


def test_figures_are_png(repro_root):
    for name in FIGURES:
        path = repro_root / "figures" / f"{name}.png"
        data = path.read_bytes()
        assert len(data) > 0 and data[:8] == PNG_SIGNATURE, name


def test_results_md(repro_root):
    md = (repro_root / "RESULTS.md").read_text()
    assert "## Table 2 (this run)" in md and "| DUME |" in md and " ± " in md
    for name, value in (("model_averaging", 83.4), ("random_routing", 82.4), ("BTX", 91.9), ("DUME", 92.8),
                        ("DUMEplus", 93.9), ("oracle", 94.8)):
        assert paper.TABLE2[name]["average"][0] == value
        assert f"**{value:.1f} ± " in md
    assert "94.5 ± 0.0" in md  # a per-domain value of the paper (DUME, Coding)
    for name in FIGURES:
        assert f"figures/{name}.png" in md
    assert "routing accuracy" in md and "**centroid**" in md and "**DUMEplus**" in md
    assert "torch " in md and "wall time" in md and "--seed 0, 1" in md
    for section in ("## Against the paper's shape", "## Where the oracle loses", "BTX's router lr",
                    "| Oracle ≥ 90 |", "pairs in the paper's order:"):
        assert section in md, section


def test_rerun_skips_finished_work(repro_root, corpus_dir):
    watched = {}
    for sub in ("shared", "seed0", "seed1", "sweeps"):
        watched[sub] = {k: v for k, v in snapshot(repro_root / sub).items() if v[0] != "dir"}
    assert run_script(reproduce_clm.main, _argv(repro_root, corpus_dir)) == 0
    for sub, before in watched.items():
        after = {k: v for k, v in snapshot(repro_root / sub).items() if v[0] != "dir"}
        assert after == before, sub


def test_report_regenerates_identically_elsewhere(repro_root, corpus_dir, tmp_path):
    """--report-dir rewrites the same report from the same files (only the echoed command
    differs): what the repository commits is what the command writes."""
    out = tmp_path / "report"
    assert run_script(reproduce_clm.main, _argv(repro_root, corpus_dir) + ["--report-dir", str(out)]) == 0

    def body(path):
        return [ln for ln in path.read_text().splitlines() if not ln.startswith("- command:")]

    assert body(out / "RESULTS.md") == body(repro_root / "RESULTS.md")
    assert json.loads((out / "results.json").read_text()) == json.loads((repro_root / "results.json").read_text())
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").read_bytes() == (repro_root / "figures" / f"{name}.png").read_bytes()
    assert not (out / "seed0").exists()  # the report only: checkpoints stay under the run root


def test_bad_flags_refused(tmp_path):
    assert run_script(reproduce_clm.main, ["--run-root", str(tmp_path / "r"), "--seeds", "0,0"]) == 2
    assert run_script(reproduce_clm.main, ["--run-root", str(tmp_path / "r"), "--seed", "3"]) == 2
    assert run_script(reproduce_clm.main, ["--run-root", str(tmp_path / "r"), "--sweep-methods", "BTX"]) == 2
    assert not (tmp_path / "r" / "shared").exists()
