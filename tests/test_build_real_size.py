"""`bench/build_real_size.py` on its tiny preset, so the real-size benchmark (issue 23) cannot rot: it builds,
reads the build's per-phase lines and statistics throughput, and times a plain forward in the same dtype."""

from __future__ import annotations

from bench import build_real_size as bench


def test_tiny_preset_reports_phases_throughput_and_memory(tmp_path):
    rows = bench.main(["--preset", "tiny", "--docs", "20", "--seq-len", "64", "--dtype", "float32",
                       "--work", str(tmp_path), "--evaluate"])
    (row,) = rows
    assert row["compute_dtype"] == "torch.float32"
    assert any(k.startswith("checked and fingerprinted 3 experts") for k in row["phases_s"])
    assert "statistics, gates and the MoE written" in row["phases_s"]
    assert "evaluation report" in row["phases_s"]  # --evaluate: 20 documents x 0.05 hold one out per domain
    assert row["stats_tokens"] > 0 and row["stats_tokens_per_s"] > 0 and row["plain_tokens_per_s"] > 0
    assert row["peak_rss_gb"] > 0 and row["largest_shard_gb"] > 0
