"""The evaluation report (`dume eval`, `evaluate: true`): its numbers are the CLM scripts' numbers on the same
documents, and it is written (JSON, heatmap, model card section) for a `dume build` MoE."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures import (  # noqa: F401  (pytest fixtures)
    base_args,
    copy_run,
    corpus_dir,
    datasets_cache,
    one_thread,
    run_script,
    trained_run,
)
from tests.helpers import one_error_line
from tests.test_build import _config, _write, setup  # noqa: F401  (the tiny build experts and data)

ALL_WINDOWS = ["--max-eval-blocks", "100000"]  # every test window, so the report sees the same documents


def test_report_equals_the_strategies_scripts_on_three_clm_experts(trained_run, corpus_dir, datasets_cache,
                                                                   tmp_path):
    """The issue-23 Must-show: on the three CLM experts and each domain's whole test split, `dume eval` of the DUME
    MoE gives the perplexities of `clm_moerging_strategies_eval.py` (DUME, random_routing),
    `clm_weights_avg_eval.py` and `clm_experts_eval.py`, and Table 2's normalised scores, to 1e-4."""
    import clm_experts_eval
    import clm_moerging_strategies_eval as strategies
    import clm_weights_avg_eval

    from dume.cli import main as dume_main
    from dume.corpora.documents import iter_documents
    from dume.report.clm_table import build_clm_table

    run = copy_run(trained_run, tmp_path / "clm")
    with one_thread(datasets_cache):
        args = lambda *extra: base_args(run, corpus_dir, *extra, *ALL_WINDOWS)  # noqa: E731
        for script, extra in ((clm_experts_eval, ["--redo"]), (clm_weights_avg_eval, []),
                              (strategies, ["--method", "DUME"]), (strategies, ["--method", "random_routing"])):
            assert run_script(script.main, args(*extra)) == 0
        domains = json.loads((run / "results" / "experts_eval.json").read_text())["domains"]
        data = []
        for d in domains:
            path = tmp_path / f"{d}.jsonl"
            docs, _ = iter_documents(d, "test", "local", data_dir=corpus_dir)
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
            data += ["--data", f"{d}={path}"]
        moe = run / "models" / "DUME"
        assert dume_main(["eval", str(moe), *data, "--seq-len", "32", "--batch-size", "5", "--random-routing",
                          "--dtype", "float32"]) == 0
    report = json.loads((moe / "dume_eval.json").read_text())
    table = build_clm_table(run)["methods"]
    rows = {"MoE": "DUME", "model_averaging": "model_averaging", "random_routing": "random_routing",
            **{f"{d}_expert": f"{d}_expert" for d in domains}}
    assert set(report["results"]) == set(rows)
    for ours, theirs in rows.items():
        for d in domains:
            got, want = report["results"][ours][d]["perplexity"], table[theirs]["perplexity"][d]
            assert abs(got - want) <= 1e-4 * want, (ours, d, got, want)
            assert abs(report["normalised"][ours]["per_domain"][d] - table[theirs]["normalised"][d]) <= 1e-4
        assert abs(report["normalised"][ours]["average"] - table[theirs]["average"]) <= 1e-4
    dume = json.loads((run / "results" / "DUME.json").read_text())
    for d in domains:  # the routing shares too: the same top-1 rule on the same tokens
        torch.testing.assert_close(torch.tensor(report["routing_shares"][d]),
                                   torch.tensor(dume["routing_shares"][d]), rtol=0, atol=1e-9)
    card = (moe / "README.md").read_text()
    assert card.count("## Evaluation (`dume eval`)") == 1 and (moe / "dume_eval_routing.png").stat().st_size > 1000


def test_build_with_evaluate_writes_the_report_into_its_card(setup, capsys):
    """`evaluate: true`: the report is part of the build (JSON, heatmap, card section, in the one rename);
    `dume eval CONFIG.yaml` remakes it with the same numbers and replaces the card's section, not adds one."""
    from dume.cli import main

    root, _ = setup
    cfg = _config(root, out="out/evaluated", evaluate={"random_routing": True})
    assert main(["build", str(_write(root, cfg, "evaluated.yaml"))]) == 0
    out = root / "out" / "evaluated"
    report = json.loads((out / "dume_eval.json").read_text())
    names = [e["name"] for e in cfg["experts"]]
    assert list(report["results"]) == ["MoE", *(f"{n}_expert" for n in names), "model_averaging", "random_routing"]
    assert report["documents"] == {n: 3 for n in names}  # held_out 0.1 of 30 documents each
    for name, per in report["results"].items():
        scores = report["normalised"][name]["per_domain"]
        for d in names:  # the normalised score is computed from the perplexities it shows
            own = report["results"][f"{d}_expert"][d]["perplexity"]
            assert scores[d] == pytest.approx(100 * own / per[d]["perplexity"], rel=1e-12)
    avg, moe = report["normalised"]["model_averaging"]["average"], report["normalised"]["MoE"]["average"]
    # random tiny experts do not specialise: averaging may already score above 100, and then there is no gap
    want = 100 * (moe - avg) / (100 - avg) if avg < 100 else None
    assert report["gap_closed"]["average"] == (pytest.approx(want, rel=1e-9) if want is not None else None)
    assert len(report["routing_shares"]["law"]) == 2  # tiny_llama's layers
    assert report["cost"]["models"] == len(names) + 3
    card = (out / "README.md").read_text()
    assert "# DUME MoE of 3 experts" in card and card.count("## Evaluation (`dume eval`)") == 1
    assert (out / "dume_eval_routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".*averaging*")), "the temporary averaged model is removed"
    capsys.readouterr()
    assert main(["eval", str(root / "evaluated.yaml")]) == 0
    again = json.loads((out / "dume_eval.json").read_text())
    for name in report["results"]:
        for d in names:
            assert again["results"][name][d]["perplexity"] == pytest.approx(report["results"][name][d]["perplexity"],
                                                                             rel=1e-9)
    assert (out / "README.md").read_text().count("## Evaluation (`dume eval`)") == 1
    assert "# DUME MoE of 3 experts" in (out / "README.md").read_text()


@pytest.mark.parametrize("argv, needle", [
    (lambda root: ["eval", str(root / "out" / "nothing")], "neither a build YAML nor a MoE folder"),
    (lambda root: ["eval", str(root / "out" / "evaluated")], "--data DOMAIN=PATH"),
    (lambda root: ["eval", str(root / "out" / "evaluated"), "--data", f"tax={root / 'data' / 'law.txt'}"],
     "tax"),
    (lambda root: ["eval", str(root / "out" / "evaluated"), "--data", "law"], "DOMAIN=PATH"),
    (lambda root: ["eval", str(root / "out" / "evaluated"), "--data", f"law={root / 'data' / 'law.txt'}",
                   "--keep-averaging", str(root / "data")], "nothing is replaced"),
])
def test_bad_eval_requests_are_one_line(setup, capsys, argv, needle):
    from dume.cli import main

    root, _ = setup
    if not (root / "out" / "evaluated").is_dir():
        pytest.skip("needs the build of test_build_with_evaluate_writes_the_report_into_its_card")
    before = (root / "out" / "evaluated" / "dume_eval.json").read_bytes()
    one_error_line(capsys, main(argv(root)), needle)
    assert (root / "out" / "evaluated" / "dume_eval.json").read_bytes() == before


def test_evaluate_without_held_out_documents_is_refused_before_any_work(setup, capsys):
    from dume.cli import main

    root, _ = setup
    path = _write(root, _config(root, out="out/never", evaluate=True, held_out=0), "no_held.yaml")
    one_error_line(capsys, main(["build", str(path)]), "held_out")
    assert not (root / "out" / "never").exists()
