"""Dense experts -> a routed MoE: the one pipeline, `dume build`, and dynamic edits."""
