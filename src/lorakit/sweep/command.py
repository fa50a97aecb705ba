"""`lorakit sweep`: its flags, and how a sweep is started, resumed or joined."""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from pathlib import Path

from lorakit.errors import ConfigError, InterruptedTrainingError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="sweep file: base: (lorakit train settings) and search: "
                        "(the settings to try); rerun the same command to resume a stopped sweep")
    parser.add_argument("--out", default=None, help="sweep folder: trials/<number>/, leaderboard.md/.csv, "
                        "pareto.png, best.yaml, and study.db unless --storage (default with --join: the sweep's)")
    parser.add_argument("--trials", type=int, default=None,
                        help="trials in total, counting those already done (default: the file's, else 10)")
    parser.add_argument("--workers", type=int, default=1, help="trial processes on this machine")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per trial (default: base threads, else cores ÷ workers)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL shared by workers on several machines, e.g. "
                             "postgresql://user:password@host/db (default: sqlite:///OUT/study.db)")
    parser.add_argument("--study", default=None, help="study name in the storage (default: lorakit-sweep; with "
                        "--join: the storage's only study)")
    parser.add_argument("--objectives", default=None,
                        help="comma list of metric, forgetting, params: several make a multi-objective sweep "
                             "with a Pareto front (default: the file's, else metric)")
    parser.add_argument("--join", default=None, metavar="DIR_OR_URL",
                        help="add workers to a running sweep: its folder (SQLite) or its storage URL; the sweep's "
                             "settings are read from the study")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a --workers child: no summary


def run(args: argparse.Namespace) -> int:
    from lorakit.sweep import outputs, processes
    from lorakit.sweep import study as studies
    from lorakit.sweep.spec import read_spec
    from lorakit.sweep.worker import work

    started = time.perf_counter()
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise ConfigError("--threads must be at least 1")
    if args.join:
        if args.config or args.trials is not None or args.objectives or args.storage:
            raise ConfigError("--join reads the sweep from its study: drop --config, --trials, --objectives and "
                              "--storage (resume with the sweep file to change --trials)")
        url = studies.storage_for(args.join)
        study, spec, stored_out = studies.join(url, args.study)
        out = Path(args.out) if args.out else stored_out
        target = args.join
    else:
        if not args.config or not args.out:
            raise ConfigError("give --config SWEEP.yaml and --out DIR (or --join DIR_OR_URL to add workers)")
        spec = read_spec(args.config, trials=args.trials, objectives=args.objectives)
        out = Path(args.out)
        url = args.storage or studies.default_storage(out)
        out.mkdir(parents=True, exist_ok=True)
        study = studies.create_or_resume(spec, out, url, args.study or studies.DEFAULT_STUDY)
        target = str(out) if args.storage is None else url
        for note in spec.notes:
            print(f"lorakit sweep: {note}", flush=True)
    workers = min(args.workers, spec.trials)
    threads = processes.threads_per_worker(args.threads, int(spec.base.get("threads", 0)), workers)
    say = functools.partial(print, flush=True)
    try:
        if not args.worker and workers > 1:
            codes = processes.run_workers(workers, target, study.study_name, out, threads)
            for code in codes:
                if code:
                    print(f"lorakit sweep: a worker exited with code {code} (its output above says why); "
                          "this process runs what is left", flush=True)
        work(study, spec, out, threads, say)  # alone, or after the workers: whatever is left or was queued again
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):  # the leaderboard shows the interrupted trial and its queued re-run
            outputs.write_tables(study, spec, out)
        raise InterruptedTrainingError("stopped; rerun the same command to resume: finished trials are kept and "
                                       "the interrupted ones run again") from None
    if args.worker:
        return 0
    for line in outputs.finish(study, spec, out, time.perf_counter() - started):
        print(line, flush=True)
    return 0
