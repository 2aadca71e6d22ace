"""``distil search``: hyperparameter and student-shape search over distil runs, built on Optuna.

Every trial is a normal ``distil run`` in its own subprocess and run folder, so a killed worker
loses only the trial it was running, and that trial is resumed from its checkpoints when it is
re-run. The package is split by concept:

- :mod:`distil.search.config`: the ``search:`` section (space, objectives, budget, storage,
  sampler, pruner, flash runs, noise-aware selection, the final test).
- :mod:`distil.search.space`: distributions parsed from ``key=loguniform(1, 8)`` and turned into
  dotted overrides.
- :mod:`distil.search.objectives`: numbers read from a run's ``report.json`` and ``metrics.jsonl``.
- :mod:`distil.search.budget`: what a study has spent (trials, busy wall time, examples).
- :mod:`distil.search.stats`: Pareto fronts and confidence intervals.
- :mod:`distil.search.runs`: one ``distil run`` subprocess, watched while it trains.
- :mod:`distil.search.study`: the Optuna study, its workers, heartbeats and stale-trial retries.
- :mod:`distil.search.select`: top candidates re-run over several seeds; the final test.
- :mod:`distil.search.report`: the study report (Pareto front, importances, trials, best YAML).

Optuna is imported lazily (``pip install 'distil[search]'``).
"""
