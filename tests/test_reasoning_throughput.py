"""`bench/reasoning_throughput.py` times generation through the path `reasoning_eval.py` takes
(lm-eval's `HFLM.generate_until` at the evaluation's `max_length`), checks that the batch
really reaches `model.generate`, and bases Table 3's hours on that path (issue 22, item 5)."""

from __future__ import annotations

import json

from bench import reasoning_throughput as bench
from dume.reasoning.evaluate import max_length_for


def test_generation_is_timed_through_lm_eval_in_batches(tmp_path):
    out = bench.main(["--preset", "tiny", "--gen-tokens", "4", "--repeats", "1", "--batch-size", "3",
                      "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["lm_eval"] == out["lm_eval"]
    generate = [t for t, w in bench.WORKLOAD.items() if w["kind"] == "generate"]
    for kind in ("moe", "dense"):
        assert sorted(out["lm_eval"][kind]) == sorted(generate)
        for task in generate:
            lm = out["lm_eval"][kind][task]
            assert lm["batch"] == 3 and lm["largest_generate_batch"] == 3  # generation batches
            assert lm["max_length"] == max_length_for(type("C", (), {"max_position_embeddings": 2048}), 4) == 2048
            assert out["seconds_per_doc"][kind][task] == lm["seconds_per_doc"] > 0
    w = bench.WORKLOAD["math"]
    expected = bench.SEEDS * w["docs"] * (bench.MOE_ROWS * out["seconds_per_doc"]["moe"]["math"]
                                          + bench.DENSE_ROWS * out["seconds_per_doc"]["dense"]["math"]) / 3600
    assert abs(out["table3_hours"]["math"] - expected) < 1e-9
