"""`lorakit sweep`: a cheap hyperparameter search over `lorakit train` settings, with a leaderboard.

One Optuna study per sweep (SQLite in the sweep folder, or a shared database for workers on
several machines). Each trial is a `lorakit train` run in DIR/trials/<number>/; its evaluations
feed the pruner; the sweep writes leaderboard.md/.csv, pareto.png and best.yaml, which
`lorakit train --config` reruns exactly. Modules: ``spec`` (the sweep file), ``space`` (the
search space), ``study`` (storage, samplers, pruners), ``trial`` (one run), ``liveness`` (dead
workers' trials queued again), ``worker`` (the trial loop), ``processes`` (--workers),
``outputs`` (what is written), ``command`` (the CLI).
"""

from lorakit.sweep.spec import SweepSpec, read_spec, spec_from_dict

__all__ = ["SweepSpec", "read_spec", "spec_from_dict"]
