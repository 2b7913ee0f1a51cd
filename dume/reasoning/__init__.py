"""The reasoning setting (Table 3): statistics, strategies, evaluation, tasks, the sandbox."""
