"""The real mergekit-moe as a peer of the routers study (issue 23): the YAML it gets from a run (experts in
domain order, the same prompts as `mergekit_hidden`, the base, the gate mode), the report's rows and labels for
peer results (scored like every row, kept out of Table 2 and of the verdict), the study's refusals, and -- given
a `mergekit-moe` executable in DUME_MERGEKIT_MOE (CI has no mergekit venv) -- the real tool end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.fixtures import base_args, copy_run, make_run, one_thread
from tests.fixtures import corpus_dir, datasets_cache, trained_run  # noqa: F401  (pytest fixtures)

MERGEKIT = os.environ.get("DUME_MERGEKIT_MOE")
DOMAINS = ("code", "math", "history")


@pytest.fixture
def run_copy(trained_run, corpus_dir, datasets_cache, tmp_path):
    """A private copy of the tiny trained run, with model averaging (the second base) and the experts' scores."""
    import clm_experts_eval
    import clm_weights_avg_eval

    run_dir = copy_run(trained_run, tmp_path / "clm")
    with one_thread(datasets_cache):
        clm_weights_avg_eval.main(base_args(run_dir, corpus_dir))
        clm_experts_eval.main(base_args(run_dir, corpus_dir))
    return run_dir


def test_row_names_round_trip_and_refuse_strangers():
    from dume.errors import DumeError
    from dume.routers import mergekit_moe as mk

    assert len(mk.rows()) == len(mk.GATE_MODES) * len(mk.BASES) == 6
    for name in mk.rows():
        mode, base = mk.parse_row(name)
        assert mk.row_name(mode, base) == name and ":" not in mk.result_stem(name)
    assert mk.result_stem("DUME") == "DUME" and not mk.is_peer("mergekit_hidden")
    for bad in ("mergekit-moe:hidden", "mergekit-moe:cheap@seed", "mergekit-moe:random@oracle", "DUME"):
        with pytest.raises(DumeError, match="not a mergekit-moe row"):
            mk.parse_row(bad)


@pytest.mark.parametrize("row", ["mergekit-moe:hidden@seed", "mergekit-moe:cheap_embed@model_averaging"])
def test_the_yaml_mergekit_gets_from_a_tiny_run(run_copy, corpus_dir, datasets_cache, monkeypatch, row):
    """What `mergekit_row` hands the tool, caught at the subprocess: read back from the YAML file it wrote."""
    import yaml

    import clm_moerging_strategies_eval as strategies_script
    import clm_routers_study as study
    from dume.errors import DumeError
    from dume.routers import mergekit_moe as mk

    seen = {}

    def catch(exe, config, out_dir, *, seed, log_path):
        path = mk.write_config(Path(out_dir) / "mergekit_moe_config.yml", config)
        seen.update(exe=exe, seed=seed, yaml=yaml.safe_load(path.read_text(encoding="utf-8")))
        raise DumeError("caught before the tool")

    monkeypatch.setattr(mk, "run_mergekit", catch)
    with one_thread(datasets_cache), pytest.raises(DumeError, match="caught before the tool"):
        study.mergekit_row(base_args(run_copy, corpus_dir, "--seed", 3), "/x/mergekit-moe", row)
    run = make_run(run_copy, corpus_dir)
    mode, base = mk.parse_row(row)
    want_base = run.seed_dir if base == "seed" else run.model_dir("model_averaging")
    prompts = strategies_script.prompt_gate_inputs(run, list(DOMAINS))["prompts"]  # mergekit_hidden's prompts
    got = seen["yaml"]
    assert seen["exe"] == "/x/mergekit-moe" and seen["seed"] == 3
    assert got["base_model"] == str(want_base.resolve()) and got["gate_mode"] == mode
    assert got["experts_per_token"] == 1 and got["dtype"] == "float32"
    assert [e["source_model"] for e in got["experts"]] == [str(run.expert_dir(d).resolve()) for d in DOMAINS]
    assert [e["positive_prompts"] for e in got["experts"]] == [prompts[d] for d in DOMAINS]
    assert all(len(p) == 8 for p in prompts.values()) and len({tuple(p) for p in prompts.values()}) == 3
    assert not run.model_dir(mk.result_stem(row)).exists()  # a failed tool leaves no model behind


def _fake_results(run_dir: Path, peer: str, scale: dict[str, float]):
    """A seed's result files: experts (reference 10 on every domain), model averaging, the oracle, DUME and one
    peer row, each with perplexity = 10 / its normalised score."""
    from dume.routers import mergekit_moe as mk

    res = run_dir / "results"
    res.mkdir(parents=True)
    experts = {f"{d}_expert": {e: {"perplexity": 10.0 if e == d else 20.0} for e in DOMAINS} for d in DOMAINS}
    (res / "experts_eval.json").write_text(json.dumps({"domains": list(DOMAINS), "results": experts}))
    for name, score in scale.items():
        payload = {"name": name, "results": {d: {"perplexity": 10.0 * 100.0 / score[d]} for d in DOMAINS}}
        if mk.is_peer(name):
            payload.update(settings={"tag": "peer"}, routing_accuracy={d: [0.5, 0.25] for d in DOMAINS})
        (res / f"{mk.result_stem(name)}.json").write_text(json.dumps(payload))


def test_report_rows_and_labels_for_peer_results(tmp_path):
    from dume.report.multiseed import seed_table
    from dume.report.routers_study import markdown, set_summary, verdict
    from dume.routers import mergekit_moe as mk

    peer = "mergekit-moe:hidden@seed"
    rows = ["model_averaging", "oracle", "DUME", peer]
    scores = dict(zip(rows, ({"code": 80, "math": 80, "history": 80}, {"code": 90, "math": 90, "history": 90},
                             {"code": 82, "math": 84, "history": 83}, {"code": 95, "math": 84, "history": 79})))
    dirs = {}
    for s in (0, 1):
        dirs[s] = tmp_path / f"seed{s}"
        _fake_results(dirs[s], peer, {n: {d: v + s for d, v in sc.items()} for n, sc in scores.items()})
    assert peer not in seed_table(dirs[0])["methods"]  # tagged: never a row of Table 2
    summary = set_summary(dirs, rows, {"x seed0 " + peer: 30.0, "x seed1 " + peer: 40.0}, "x")
    row = summary["rows"][peer]
    want = {s: (95 + 84 + 79) / 3 + s for s in (0, 1)}
    assert row["per_seed_average"] == pytest.approx(want)
    assert row["gap_closed"]["mean"] == pytest.approx(100 * (86 - 80) / 10)
    assert row["routing_accuracy"] == {d: pytest.approx(0.375) for d in DOMAINS} and row["seconds"] == 35.0
    decision = verdict({"x": summary})
    assert decision == {"default": "DUME", "winners": []}  # beats DUME on both seeds, yet no candidate
    descriptions = {peer: mk.description(peer)}
    md = markdown({"x": summary}, descriptions, decision, {"x": 60.0}, peers="mergekit 0.1.5")
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {peer} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "seed model + 8 prompts; seed model's shared weights" and cells[2] == "yes"
    assert cells[6] == "**86.5 ± 0.7**" and cells[7] == "60 ± 0"
    assert "mergekit 0.1.5" in md and all(d in md for d in mk.METHOD_DIFFERENCES)
    for needle in ("copies the base model's non-MLP weights", "bf16", "LEFT", "average the experts'"):
        assert needle in md
    without = markdown({"x": set_summary(dirs, rows[:3])}, {}, decision, {"x": 60.0},
                       peers="skipped: no --mergekit-moe")
    assert "Not run here (skipped: no --mergekit-moe)" in without and mk.VENV_HOWTO in without
    assert f"| {peer} |" not in without


def test_the_study_skips_or_refuses_the_peer_in_one_line(tmp_path, capsys):
    import clm_routers_study as study
    from dume.errors import DumeError

    args, _ = study.parse(["--peers", "mergekit"])
    assert args.peer_rows == [] and args.peer_note == "skipped: no --mergekit-moe"
    assert "mergekit peer skipped: no --mergekit-moe" in capsys.readouterr().out
    for exe in (tmp_path / "missing", "/bin/true"):  # absent; runs, but is not mergekit-moe
        with pytest.raises(DumeError, match="does not run") as e:
            study.parse(["--peers", "mergekit", "--mergekit-moe", str(exe)])
        assert "\n" not in str(e.value)
    with pytest.raises(DumeError, match="add --peers mergekit"):
        study.parse(["--mergekit-moe", "/bin/true"])
    with pytest.raises(DumeError, match="--peers: choose from mergekit"):
        study.parse(["--peers", "mergekit,peft"])
    with pytest.raises(DumeError, match="--redo-rows must be among"):  # a peer row needs its peer to run
        study.parse(["--peers", "mergekit", "--redo-rows", "mergekit-moe:random@seed"])


@pytest.mark.skipif(not MERGEKIT, reason="no mergekit-moe: set DUME_MERGEKIT_MOE to its executable (its own venv)")
def test_the_real_mergekit_moe_end_to_end(run_copy, corpus_dir, datasets_cache, capsys):
    """Two rows through the real tool: its hidden gate is ours up to bf16, its shared weights are the base's, its
    experts the experts' MLPs, one expert per token; the rows are scored, and a rerun does not redo them."""
    import clm_moerging_strategies_eval as strategies_script
    import clm_routers_study as study
    from dume.checkpoint.reader import CheckpointReader
    from dume.moe.edit import read_gates
    from dume.report.routers_study import set_summary
    from dume.routers import mergekit_moe as mk
    from dume.routers.prompt_hidden import prompt_hidden_gates

    assert mk.check_executable(MERGEKIT) != ""
    run = make_run(run_copy, corpus_dir)
    rows = ["mergekit-moe:hidden@seed", "mergekit-moe:random@model_averaging"]
    with one_thread(datasets_cache):
        strategies_script.main(base_args(run_copy, corpus_dir, "--method", "oracle"))  # the gap's far end
        for row in rows:
            study.mergekit_row(base_args(run_copy, corpus_dir), MERGEKIT, row)
        inputs = strategies_script.prompt_gate_inputs(run, list(DOMAINS))
        ours = prompt_hidden_gates(run.seed_dir, run.tokenizer, inputs["prompts"], list(DOMAINS))
    hidden = run.model_dir(mk.result_stem(rows[0]))
    for theirs, mine in zip(read_gates(hidden), ours):
        assert torch.nn.functional.cosine_similarity(theirs.double(), mine.double(), dim=-1).min() > 0.999
    config = json.loads((hidden / "config.json").read_text())
    assert config["num_experts_per_tok"] == 1 and config["num_local_experts"] == 3
    with CheckpointReader(hidden) as moe, CheckpointReader(run.seed_dir) as seed, \
            CheckpointReader(run.expert_dir("math")) as math:
        assert torch.equal(moe.get("model.embed_tokens.weight"), seed.get("model.embed_tokens.weight"))
        assert torch.equal(moe.get("model.layers.0.mlp.experts.down_proj")[1],
                           math.get("model.layers.0.mlp.down_proj.weight"))
    with CheckpointReader(run.model_dir(mk.result_stem(rows[1]))) as moe, \
            CheckpointReader(run.model_dir("model_averaging")) as avg:
        assert torch.equal(moe.get("model.norm.weight"), avg.get("model.norm.weight"))
    result = json.loads(run.result_path(mk.result_stem(rows[0])).read_text())
    assert result["name"] == rows[0] and result["settings"]["tag"] == "peer" and set(result["results"]) == set(DOMAINS)
    stamp = run.result_path(mk.result_stem(rows[0])).stat().st_mtime_ns
    capsys.readouterr()
    with one_thread(datasets_cache):
        study.mergekit_row(base_args(run_copy, corpus_dir), MERGEKIT, rows[0])
    assert "exists; skipping" in capsys.readouterr().out
    assert run.result_path(mk.result_stem(rows[0])).stat().st_mtime_ns == stamp
    summary = set_summary({0: run_copy}, ["model_averaging", *rows])
    assert set(summary["rows"]) == {"model_averaging", *rows}
    assert all(0 < summary["rows"][r]["average"]["mean"] < 200 for r in rows)
