"""DUME: Dynamic Upcycling MoE.

Training-free combination of dense Llama experts into one Mixtral-style MoE whose routers are set by the
closed-form ridge-regression solution. See README.md and docs/design.md."""

__version__ = "0.1.0"
