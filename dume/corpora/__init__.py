"""The CLM corpora (embedded Wikipedia summaries and stdlib code, the hub's M2D2, local files)."""
