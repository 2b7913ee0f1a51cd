"""The supported dense -> MoE architectures, as one table."""
