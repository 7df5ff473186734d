"""What the commands do: train, evaluate, predict, the demo (and, later, experiment matrices)."""
