"""Checkpoints on disk: atomic writes, lazy reading, fingerprints, the experts' checks.

Imports nothing above it (docs/design.md §7)."""
