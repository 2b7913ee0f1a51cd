"""Building and editing checkpoints: averaging, MoErging, oracles, routers and experts of a MoE."""
