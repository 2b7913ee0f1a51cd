"""Tables, plots and the paper's numbers, from result files only."""
