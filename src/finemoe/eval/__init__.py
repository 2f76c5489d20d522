"""Evaluation: `finemoe bench` (history from a build split, evaluation on the held-out split, in the
engine or the simulator) and the experiments of docs/RESULTS.md."""
