"""Routers: the strategy registry, closed-form and data-free gates, router training."""
