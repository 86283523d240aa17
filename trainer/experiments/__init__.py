"""Experiment tooling around the training service: benchmarks (``tailrec bench``), ablation grids
(``tailrec ablate``), their plots, and the demo. Nothing in the service imports this package."""
