"""The causal-LM setting (Table 2): the run directory and its token files."""
