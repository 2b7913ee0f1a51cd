"""Training: the loop, model presets, perplexity, throughput."""
