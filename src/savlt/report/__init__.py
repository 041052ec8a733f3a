"""Tables, plots and the markdown report of a run."""
