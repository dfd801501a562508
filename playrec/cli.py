"""The `playrec` console script: one command, a subcommand per job (each has --help)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("playrec")

EXIT_USAGE = 2
EXIT_NOT_FOUND = 3


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- train ------------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """ALS, index and store flags shared by `train` and `retrain`."""
    from batch.als import AlsParams

    d = AlsParams()
    parser.add_argument("--out", type=Path, required=True, help="model store directory (created if missing)")
    parser.add_argument(
        "--factors", type=_positive_int, default=d.factors, help=f"latent factors (default {d.factors})"
    )
    parser.add_argument("--iterations", type=int, default=d.iterations, help=f"ALS iterations (default {d.iterations})")
    parser.add_argument("--alpha", type=float, default=d.alpha, help=f"confidence scale (default {d.alpha})")
    parser.add_argument("--reg", type=float, default=d.reg, help=f"L2 regularisation lambda (default {d.reg})")
    parser.add_argument(
        "--reg-exp",
        type=float,
        default=d.reg_exp,
        help="frequency scaling of --reg: each user's and track's lambda is reg * (its number of plays) ** reg-exp "
        f"(0: one constant lambda, 1: ALS-WR / Spark's; default {d.reg_exp:g})",
    )
    parser.add_argument(
        "--confidence",
        choices=("log", "linear"),
        default=d.confidence,
        help="c = 1 + alpha*log(1 + plays/eps) (log, default) or c = 1 + alpha*plays (linear)",
    )
    parser.add_argument("--eps", type=float, default=d.eps, help=f"eps of the log confidence (default {d.eps})")
    parser.add_argument("--solver", choices=("cg", "cholesky"), default=d.solver, help="half-step solver (default cg)")
    parser.add_argument(
        "--cg-steps", type=_positive_int, default=d.cg_steps, help=f"CG steps per half-step (default {d.cg_steps})"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    parser.add_argument(
        "--engine", choices=("numpy", "spark"), default="numpy", help="ALS engine: playrec's own or Spark MLlib"
    )
    parser.add_argument("--spark-master", default="local[2]", help="Spark master URL for --engine spark")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="choose --confidence, --alpha, --reg and --reg-exp (0 or 1) on a validation split of the training plays "
        "(warm-started screening of a coarse grid, then a pattern search; the work is planned from the data's "
        "shape, so a rerun makes the same choice; the trials go into the manifest; a retrain searches around a "
        "tuned live model's choice; docs/BENCHMARKS-als.md)",
    )
    parser.add_argument(
        "--tune-budget",
        type=float,
        default=5.0,
        help="--tune: the most work the search may take, in plain fits, evaluations included (default 5)",
    )
    parser.add_argument("--keep", type=_positive_int, default=5, help="model versions to keep (default 5)")
    parser.add_argument(
        "--trees", type=_positive_int, default=1, help="trees of each search forest (default 1: leaf-scan search)"
    )
    parser.add_argument("--no-index", action="store_true", help="build no search forest (exact scoring only)")
    parser.add_argument("--app-id", default="playrec", help="the workers' app id, for --from-kafka (default playrec)")
    parser.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="--from-kafka: train without records that are not user-state rows (listed in the manifest)",
    )
    parser.add_argument("--topic-prefix", default="", help="prefix of the model-updates topic (default none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def tune_settings_from_args(args: argparse.Namespace):
    """TuneSettings for --tune (None without it)."""
    if not args.tune:
        return None
    from batch.tuning import TuneSettings, TuningError

    try:
        return TuneSettings(budget=args.tune_budget)
    except TuningError as exc:
        raise CliError(str(exc)) from None


def describe_tuning(t) -> str:
    """One line for a TuneResult."""
    c = t.choice
    return (
        f"tuned in {t.seconds:.1f} s ({len(t.trials)} candidates, {t.work:.2f} plain fits of work): "
        f"{c.confidence} confidence, alpha {c.alpha:g}, reg {c.reg:g}, reg-exp {c.reg_exp:g}"
    )


def params_from_args(args: argparse.Namespace):
    """(AlsParams, ForestParams | None, trainer) from the shared model flags."""
    from batch.als import AlsParams, AlsParamsError
    from batch.forests import ForestParams
    from batch.training import numpy_trainer

    try:
        params = AlsParams(
            factors=args.factors,
            iterations=args.iterations,
            alpha=args.alpha,
            reg=args.reg,
            reg_exp=args.reg_exp,
            confidence=args.confidence,
            eps=args.eps,
            solver=args.solver,
            cg_steps=args.cg_steps,
            seed=args.seed,
        )
    except AlsParamsError as exc:
        raise CliError(str(exc)) from None
    if args.engine == "spark" and params.reg_exp not in (0, 1):
        raise CliError(
            f"--engine spark trains --reg-exp 0 or 1 only (Spark scales reg by n ** 1), got {params.reg_exp:g}"
        )
    forest = None if args.no_index else ForestParams(n_trees=args.trees, seed=args.seed)
    trainer = numpy_trainer
    if args.engine == "spark":
        from batch.spark_engine import train_spark

        def trainer(plays, p, show_progress):
            return train_spark(plays, p, master=args.spark_master, show_progress=show_progress)

        trainer.engine = "spark"  # recorded in the manifest's training.engine

    return params, forest, trainer


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--plays", type=Path, help="CSV/TSV of user,track,plays[,timestamp]")
    source.add_argument(
        "--from-kafka",
        metavar="BOOTSTRAP",
        help="train on the stream's counts: snapshot the workers' user-state changelog on this broker",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--holdout",
        type=_fraction,
        default=0.2,
        help="fraction of each user's tracks held out to evaluate before publishing; 0 skips (default 0.2)",
    )
    parser.add_argument("--binarize", action="store_true", help="count every row as one stream (e.g. ratings)")
    parser.add_argument(
        "--stream-only",
        action="store_true",
        help="--from-kafka: train on the stream alone, dropping the history of the live model in --out "
        "(by default the live model's history, e.g. the file it came from, is added: docs/RETRAIN.md)",
    )
    parser.add_argument(
        "--announce",
        metavar="BOOTSTRAP",
        default=None,
        help="after publishing, announce the version on topic model-updates of this Kafka broker",
    )


def run_train(args: argparse.Namespace) -> int:
    from batch.model_store import ModelStore
    from batch.plays import PlaysFileError, read_play_counts
    from batch.training import train_and_publish

    params, forest, trainer = params_from_args(args)
    if args.from_kafka:
        from batch.snapshot import SnapshotError, snapshot_counts
        from stream.settings import KafkaSecurity

        try:
            snap = snapshot_counts(
                args.from_kafka,
                args.app_id,
                args.skip_bad_records,
                client_kwargs=KafkaSecurity.from_env().kafka_python_kwargs(),
            )
        except SnapshotError as exc:
            raise CliError(str(exc)) from None
        counts, source = snap.counts, snap.source()
        print(
            f"snapshot of {snap.topic}: {snap.records:,} records, {counts.shape[0]:,} users, "
            f"{counts.nnz:,} (user, track) counts; watermark {source['offsets']}"
        )
        from batch.history import lineage_fields, merge_history
        from batch.model_store import ModelStoreError

        live = None
        if not args.stream_only:
            try:
                live = ModelStore(args.out).load()
            except ModelStoreError:
                live = None  # no lineage yet: the stream is the whole history
        merged = merge_history(live, counts)
        counts, history = merged.counts, {"history": merged.history, "lineage": lineage_fields(live, merged.history)}
        if merged.history is not None:
            source["source"] = "history+stream"
            print(f"+ the history of {live.version}: {merged.history.nnz:,} counts; {counts.nnz:,} in all")
    else:
        history = {}
        try:
            counts = read_play_counts(args.plays, binarize=args.binarize)
        except PlaysFileError as exc:
            raise CliError(str(exc)) from None
        source = {"source": "file", "path": str(args.plays.resolve()), "sha256": _file_sha256(args.plays)}
        log.info("read %s: %s; %d users x %d tracks", args.plays, counts.summary.describe(), *counts.shape)
    store = ModelStore(args.out, keep=args.keep)
    tuning = tune_settings_from_args(args)
    report = train_and_publish(
        counts,
        store,
        params,
        holdout=args.holdout,
        source=source,
        show_progress=not args.no_progress,
        forest=forest,
        trainer=trainer,
        announce=_announcer(args.announce, store, args.topic_prefix),
        tuning=tuning,
        **history,
    )
    if report.tuning is not None:
        print(describe_tuning(report.tuning))
    if report.metrics is not None:
        print(f"holdout {args.holdout:.0%}: {report.metrics.describe()}")
        print(f"popularity: {report.baseline.describe()}")
    print(
        f"published model {report.version} to {store.models} "
        f"({counts.shape[0]:,} users x {counts.shape[1]:,} tracks, {report.seconds_per_iteration:.3f} s/iteration)"
    )
    if args.announce:
        print(f"announced {report.version} on {args.topic_prefix}model-updates at {args.announce}")
    return 0


def _announcer(bootstrap: str | None, store, topic_prefix: str):
    """A callback announcing a published version on model-updates, or None."""
    if not bootstrap:
        return None
    from stream.announce import announce_model

    return lambda version: announce_model(bootstrap, version, store.root, topic_prefix=topic_prefix)


# -- retrain ----------------------------------------------------------------------------------
def add_retrain_arguments(parser: argparse.ArgumentParser) -> None:
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--once", action="store_true", help="run one cycle and exit (0 whether or not it published)")
    when.add_argument("--every", metavar="DURATION", help="run a cycle every DURATION (e.g. 6h, 30m) until stopped")
    parser.add_argument("--from-kafka", metavar="BOOTSTRAP", required=True, help="the broker the workers use")
    add_model_arguments(parser)
    parser.add_argument("--holdout", type=_fraction, default=0.2, help="per-user holdout for the gate (default 0.2)")
    parser.add_argument(
        "--gate-metric",
        choices=("ndcg", "precision", "recall", "mpr"),
        default="ndcg",
        help="metric the candidate must not lose on (default ndcg)",
    )
    parser.add_argument(
        "--tolerance",
        type=_fraction,
        default=0.02,
        help="relative loss on the gate metric still published (default 0.02)",
    )
    parser.add_argument(
        "--announce", action="store_true", help="announce published versions on model-updates of the same broker"
    )


def run_retrain(args: argparse.Namespace) -> int:
    import signal
    import threading

    from batch.model_store import ModelStore
    from batch.retrain import RetrainConfig, RetrainError, parse_duration, retrain_forever, retrain_once
    from batch.snapshot import SnapshotError
    from batch.tuning import TuningError
    from stream.settings import KafkaSecurity

    params, forest, trainer = params_from_args(args)
    store = ModelStore(args.out, keep=args.keep)
    if args.holdout <= 0:
        raise CliError("--holdout must be > 0: the gate compares models on held-out plays")
    try:
        config = RetrainConfig(
            store=store,
            bootstrap=args.from_kafka,
            app_id=args.app_id,
            params=params,
            holdout=args.holdout,
            tolerance=args.tolerance,
            metric=args.gate_metric,
            forest=forest,
            trainer=trainer,
            announce=_announcer(args.from_kafka if args.announce else None, store, args.topic_prefix),
            skip_bad_records=args.skip_bad_records,
            client_kwargs=KafkaSecurity.from_env().kafka_python_kwargs(),
            show_progress=not args.no_progress,
            tuning=tune_settings_from_args(args),
        )
        every = parse_duration(args.every) if args.every else None
    except RetrainError as exc:
        raise CliError(str(exc)) from None
    if every is None:
        try:
            outcome = retrain_once(config)
        except (SnapshotError, RetrainError, TuningError) as exc:
            raise CliError(str(exc)) from None
        if outcome.tuning is not None:
            print(describe_tuning(outcome.tuning))
        print(f"candidate: {outcome.candidate.describe()}")
        if outcome.live is not None:
            print(f"live {outcome.live_version}: {outcome.live.describe()}")
        if outcome.published:
            print(f"published {outcome.version}: {outcome.reason}")
        else:
            print(f"kept the live model {outcome.live_version}: {outcome.reason}")
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("retraining every %s from %s into %s", args.every, args.from_kafka, store.root)
    retrain_forever(config, every, stop)
    return 0


# -- recommend / similar ----------------------------------------------------------------------
def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, required=True, help="model store directory")
    parser.add_argument("-k", type=_positive_int, default=10, help="number of results (default 10)")
    parser.add_argument("--version", help="model version (default: CURRENT)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--search",
        choices=("auto", "exact", "forest"),
        default="auto",
        help="auto (default): exact scoring up to 100,000 tracks, the model's forest above; or force either",
    )
    parser.add_argument("--exact", action="store_true", help="same as --search exact")


def _load_model(args: argparse.Namespace):
    """The store's model through the Python API (playrec.api), searching as --search says."""
    from batch.model_store import ModelStoreError
    from batch.serving import ServingError
    from playrec.api import ModelStore

    try:
        return ModelStore(args.store).load(args.version, search="exact" if args.exact else args.search)
    except (ModelStoreError, ServingError) as exc:
        raise CliError(str(exc)) from None


def _print_items(args: argparse.Namespace, head: dict, items: list) -> None:
    if args.json:
        print(json.dumps({**head, "items": [{"track": r.track, "score": r.score} for r in items]}))
        return
    for rank, r in enumerate(items, 1):
        print(f"{rank:3d}  {r.track}\t{r.score:.4f}")


def run_recommend(args: argparse.Namespace) -> int:
    from batch.serving import UnknownIdError

    model = _load_model(args)
    try:
        items = model.recommend(args.user, args.k, exclude_streamed=not args.include_streamed)
    except UnknownIdError as exc:
        print(f"playrec: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    _print_items(args, {"user": args.user, "source": "model", "version": model.version}, items)
    return 0


def run_similar(args: argparse.Namespace) -> int:
    from batch.serving import UnknownIdError

    model = _load_model(args)
    try:
        items = model.similar(args.track, args.k)
    except UnknownIdError as exc:
        print(f"playrec: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    _print_items(args, {"track": args.track, "version": model.version}, items)
    return 0


# -- broker / demo ----------------------------------------------------------------------------
def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    from playrec import devbroker

    devbroker.add_arguments(parser)


def run_broker(args: argparse.Namespace) -> int:
    from playrec import devbroker

    return devbroker.run(args)


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="user,track,plays[,timestamp] file (Last.fm counts, MovieLens u.data)")
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second; 0 = as fast as possible")
    parser.add_argument("--limit", type=_positive_int, default=None, help="stop after this many events")
    parser.add_argument("--max-per-pair", type=_positive_int, default=None, help="cap the plays expanded per pair")
    parser.add_argument("--topic", default="plays", help="topic (default plays)")
    parser.add_argument("--bootstrap", default=None, help="Kafka host:port (default $KAFKA_BOOTSTRAP)")
    parser.add_argument("--seed", type=int, default=0, help="interleaving seed for count files (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_replay(args: argparse.Namespace) -> int:
    import os

    from batch.plays import PlaysFileError
    from stream.replay import ReplayError, run_replay
    from stream.settings import KafkaSecurity

    bootstrap = args.bootstrap or os.environ.get("KAFKA_BOOTSTRAP")
    if not bootstrap:
        raise CliError("no broker: pass --bootstrap host:port or set KAFKA_BOOTSTRAP (start one with `playrec broker`)")
    try:
        sent = run_replay(
            bootstrap,
            args.file,
            args.rate,
            args.limit,
            args.max_per_pair,
            args.topic,
            args.seed,
            show_progress=not args.no_progress,
            producer_config=KafkaSecurity.from_env().kafka_python_kwargs(),
        )
    except (PlaysFileError, ReplayError) as exc:
        raise CliError(str(exc)) from None
    print(f"replayed {sent:,} events from {args.file} to {args.topic} on {bootstrap}")
    return 0


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    import os

    env = os.environ.get
    parser.add_argument("--store", type=Path, default=env("PLAYREC_STORE"), help="model store ($PLAYREC_STORE)")
    parser.add_argument("--bootstrap", default=env("KAFKA_BOOTSTRAP"), help="Kafka host:port ($KAFKA_BOOTSTRAP)")
    parser.add_argument("--port", type=int, default=int(env("PLAYREC_PORT", "6066")), help="HTTP port (default 6066)")
    parser.add_argument(
        "--host",
        default=env("PLAYREC_HOST", "127.0.0.1"),
        help="address the other workers and clients reach this worker at (default 127.0.0.1)",
    )
    parser.add_argument(
        "--bind", default=env("PLAYREC_BIND"), help="address the HTTP server listens on (default: --host)"
    )
    parser.add_argument("--app-id", default=env("PLAYREC_APP_ID", "playrec"), help="consumer group / app id")
    parser.add_argument(
        "--partitions",
        type=_positive_int,
        default=int(env("PLAYREC_PARTITIONS", "8")),
        help="partitions of plays and the tables (default 8)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=env("PLAYREC_DATA_DIR"),
        help="local table state ($PLAYREC_DATA_DIR; default $XDG_STATE_HOME/playrec/<app id>-<port>, "
        "i.e. ~/.local/state/playrec/...); a cache of the changelog topics, rebuilt from them when stale",
    )
    parser.add_argument(
        "--table-store",
        default=env("PLAYREC_TABLE_STORE"),
        help="faust table store: rocksdb:// (default when rocksdict is installed) or memory://",
    )
    parser.add_argument(
        "--min-listeners",
        type=_positive_int,
        default=5,
        help="distinct listeners before a new track is folded in (default 5)",
    )
    parser.add_argument("--search-k", type=_positive_int, default=None, help="forest candidates per query")
    parser.add_argument(
        "--session-timeout",
        type=float,
        default=30.0,
        help="seconds before a silent worker's partitions move to the others (default 30)",
    )
    parser.add_argument(
        "--admin-token-file",
        type=Path,
        default=env("PLAYREC_ADMIN_TOKEN_FILE"),
        help="file holding the bearer token of the admin routes ($PLAYREC_ADMIN_TOKEN_FILE, or the token "
        "itself in $PLAYREC_ADMIN_TOKEN); without one the admin routes answer 403",
    )
    parser.add_argument(
        "--topic-prefix",
        default=env("PLAYREC_TOPIC_PREFIX", ""),
        help="prefix of every topic name, to separate tenants or test runs (default none)",
    )
    parser.add_argument("--loglevel", default="info", choices=("debug", "info", "warn", "error"))


def run_worker(args: argparse.Namespace) -> int:
    import os

    from stream.settings import KafkaSecurity, SettingsError, Topics, WorkerSettings, read_admin_token

    if args.store is None:
        raise CliError("no model store: pass --store DIR or set PLAYREC_STORE")
    table_store = args.table_store
    if table_store is None:
        try:
            import rocksdict  # noqa: F401

            table_store = "rocksdb://"
        except ImportError:
            table_store = "memory://"
    try:
        settings = WorkerSettings(
            bootstrap=args.bootstrap or "",
            store=args.store,
            port=args.port,
            host=args.host,
            bind=args.bind,
            app_id=args.app_id,
            partitions=args.partitions,
            data_dir=args.data_dir,
            table_store=table_store,
            min_listeners=args.min_listeners,
            search_k=args.search_k,
            session_timeout_s=args.session_timeout,
            security=KafkaSecurity.from_env(),
            topics=Topics(args.topic_prefix),
            admin_token=read_admin_token(args.admin_token_file, os.environ.get("PLAYREC_ADMIN_TOKEN")),
        )
        settings.validate()
    except SettingsError as exc:
        raise CliError(str(exc)) from None
    from stream.runner import run_worker as run
    from stream.versions import UnsupportedVersionError

    try:
        return run(settings, args.loglevel)
    except (SettingsError, UnsupportedVersionError) as exc:
        raise CliError(str(exc)) from None


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, default=None, help="folder holding lastfm-2k/ (default ../shared/data or $PLAYREC_DATA)"
    )
    parser.add_argument("--store", type=Path, default=Path(".demo/store"), help="model store (default .demo/store)")
    parser.add_argument("--iterations", type=int, default=15, help="ALS iterations (default 15)")
    parser.add_argument("--port", type=int, default=0, help="the demo worker's HTTP port (default: a free one)")
    parser.add_argument(
        "--hold",
        action="store_true",
        help="keep the broker and the worker running after the demo, to browse the operator's console (Ctrl-C stops)",
    )


def run_demo(args: argparse.Namespace) -> int:
    from playrec.demo import DemoError
    from playrec.demo import run as demo

    if args.port == 0:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    try:
        return demo(args)
    except DemoError as exc:
        raise CliError(str(exc)) from None


COMMANDS = {
    "train": ("train ALS on play counts, evaluate on a holdout and publish a model", add_train_arguments, run_train),
    "retrain": (
        "periodic retrain from the stream's counts: snapshot, train, gate, publish",
        add_retrain_arguments,
        run_retrain,
    ),
    "recommend": ("top-k tracks for a user from a model store", None, run_recommend),
    "similar": ("tracks most similar to a track (cosine of item vectors)", None, run_similar),
    "worker": ("run a stream worker: Kafka plays -> counts -> fold-in -> HTTP API", add_worker_arguments, run_worker),
    "replay": ("produce play events from a data set to Kafka at a chosen rate", add_replay_arguments, run_replay),
    "broker": ("start a local Apache Kafka broker (KRaft) for development", add_broker_arguments, run_broker),
    "demo": ("the whole loop: broker, training, a stream worker, live recommendations", add_demo_arguments, run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="playrec", description="Streaming music recommender (implicit ALS + Kafka).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "recommend":
            p.add_argument("user", help="user id as in the training data")
            add_query_arguments(p)
            p.add_argument("--include-streamed", action="store_true", help="do not exclude tracks already streamed")
        elif name == "similar":
            p.add_argument("track", help="track id as in the training data")
            add_query_arguments(p)
        elif add_arguments is not None:
            add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `playrec` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:  # the Kafka clients narrate every connection at INFO
        for noisy in ("kafka", "aiokafka"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command][2](args)
    except CliError as exc:
        print(f"playrec {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
