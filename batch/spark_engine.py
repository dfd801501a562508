"""`--engine spark`: the same implicit-feedback ALS trained by Spark MLlib (`pyspark.ml.recommendation.ALS`).

`train_spark` takes the users x tracks CSR of stream counts and `AlsParams` that `batch.als.train_als`
takes and returns an `AlsResult` with the same shape contract: float32 factors whose rows are the CSR's
rows (users) and columns (tracks); a user or track without any stream gets a row of zeros.

How playrec's parameters map onto Spark's (docs/SPARK.md has the evidence):

- ids: the CSR row / column numbers are Spark's integer user / item ids (Spark needs 32-bit ints).
- confidence: Spark uses `c = 1 + alpha * r` and `p = [r > 0]` on the rating `r` it is given, so
  `confidence="linear"` passes `r = plays` and `confidence="log"` passes `r = log(1 + plays / eps)`;
  with the same `alpha` both give exactly playrec's `c`.
- regularisation: Spark follows ALS-WR and scales `regParam` by the number of ratings of the row
  being solved (lambda_u = regParam * n_u, lambda_i = regParam * n_i), where playrec (Hu et al.) uses
  one constant lambda. By default `regParam = reg / (mean tracks per user)`, so the average user gets
  playrec's lambda (`spark_reg_param`); `reg_param=` overrides it. With `reg_exp=1` playrec scales lambda
  the same way (ALS-WR), so `regParam = reg` exactly; other `reg_exp` values have no Spark equivalent.
- rank = factors, maxIter = iterations, seed = seed. Spark's initial factors and its exact Cholesky
  solves differ from playrec's (uniform start, conjugate gradient by default), so the factors are not
  equal, only comparably good.

Spark reports no loss: `AlsResult.losses` is empty, and `AlsResult.seconds` holds the fit time
divided evenly over the iterations (Spark has no per-iteration hook).

pyspark is imported lazily, inside the functions, so importing playrec stays fast; without it (or
without Java) `SparkEngineError` says what to install. The ratings reach Spark as an Arrow-backed
pandas DataFrame (`spark.sql.execution.arrow.pyspark.enabled`): numpy arrays are handed over column
by column with no Python loop per rating, and Spark distributes them from the driver, so the same
code works on `local[N]` and on a cluster without shared storage. The factors come back the same way,
one float32 column per factor.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from batch.als import AlsParams, AlsParamsError, AlsResult

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'playrec[spark]'"
#: Default driver memory for a session started here (local mode: the driver is the executor too).
DEFAULT_DRIVER_MEMORY = "1g"
#: Spark's own default block count for ALS; more blocks than this only when the cluster has more cores.
MIN_ALS_BLOCKS = 10
#: Largest id Spark's DataFrame ALS accepts (ids are Java ints).
MAX_SPARK_ID = 2**31 - 1

_LOG4J2 = """\
# playrec: keep Spark's JVM quiet (errors only) while it trains.
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
# pyspark's gateway counts as a shell: Spark resets the root level to its logger's (default WARN)
logger.gateway.name = org.apache.spark.api.python.PythonGatewayServer
logger.gateway.level = error
"""


class SparkEngineError(RuntimeError):
    """Spark training cannot run: pyspark, pandas/pyarrow or Java missing, or the session failed."""


def spark_ratings(plays: sp.csr_matrix, params: AlsParams) -> np.ndarray:
    """The ratings `r` to give Spark for the stored entries of `plays` (float32), so that Spark's
    `1 + alpha * r` is playrec's confidence: the plays (linear) or `log(1 + plays / eps)` (log)."""
    data = np.asarray(plays.data, dtype=np.float64)
    if params.confidence == "linear":
        return data.astype(np.float32)
    return np.log1p(data / params.eps).astype(np.float32)


def spark_reg_param(plays: sp.csr_matrix, reg: float, reg_exp: float = 0.0) -> float:
    """Spark's `regParam` for playrec's constant `reg`: `reg / (mean number of tracks per user)`.

    With `reg_exp=1` (playrec's lambda_r = reg * n_r, Spark's own scaling) it is `reg` itself; any other
    reg_exp raises `AlsParamsError` (Spark cannot scale lambda by n_r ** reg_exp).

    Spark solves row r with lambda_r = regParam * n_r (n_r = the row's number of ratings, ALS-WR);
    playrec uses lambda_r = reg for every user and track. No single regParam matches every row; this
    one gives the average user (over users with streams) playrec's lambda, so user vectors are shrunk
    alike, while a track's lambda grows with its listeners (playrec shrinks rarely played tracks
    harder). docs/SPARK.md has the measurements behind the choice. Returns `reg` for an empty matrix.
    """
    if reg_exp == 1:
        return float(reg)
    if reg_exp != 0:
        raise AlsParamsError(
            f"--engine spark scales reg by each row's number of plays (reg_exp 1) or approximates a constant "
            f"reg (reg_exp 0); reg_exp={reg_exp:g} has no Spark equivalent: use 0 or 1, or the numpy engine"
        )
    plays = sp.csr_matrix(plays)
    users = int(np.count_nonzero(np.diff(plays.indptr)))
    if plays.nnz == 0 or users == 0:
        return float(reg)
    return float(reg) * users / float(plays.nnz)


def java_executable() -> str | None:
    """The `java` Spark will launch: `$JAVA_HOME/bin/java` when JAVA_HOME is set, else `java` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None
    return shutil.which("java")


def _import_pyspark() -> Any:
    try:
        import pyspark
        from pyspark.sql import SparkSession  # noqa: F401
    except ImportError as exc:
        raise SparkEngineError(f"--engine spark needs pyspark ({exc}); install it with: {INSTALL_HINT}") from None
    try:
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise SparkEngineError(
            f"--engine spark hands the plays to Spark through pandas and pyarrow ({exc}); "
            f"install them with: {INSTALL_HINT}"
        ) from None
    return pyspark


def _is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[") or master.startswith("local-cluster")


@contextmanager
def _session(master: str, spark_conf: dict[str, Any] | None, show_progress: bool, workdir: Path) -> Iterator[Any]:
    """(session, started_here): a SparkSession started for one training run and stopped afterwards,
    or the session already active in this process (left running)."""
    from pyspark.sql import SparkSession

    if java_executable() is None:
        where = "JAVA_HOME/bin/java" if os.environ.get("JAVA_HOME") else "java on PATH"
        raise SparkEngineError(
            f"--engine spark needs a Java runtime (Spark 3.5 runs on Java 8, 11 or 17) and found no {where}; "
            f"install Java 17 (e.g. apt-get install openjdk-17-jre-headless) and {INSTALL_HINT}"
        )
    log4j = workdir / "log4j2.properties"
    log4j.write_text(_LOG4J2, encoding="utf-8")
    local = _is_local(master)
    conf: dict[str, str] = {
        "spark.app.name": "playrec-als",
        "spark.ui.enabled": "false",
        # Spark's stage bar redraws with carriage returns: only for a terminal, never into a log file
        "spark.ui.showConsoleProgress": "true" if show_progress and sys.stderr.isatty() else "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # the netty flag lets Arrow work on Java 11 (Spark 3.5's docs); harmless on 17
        "spark.driver.extraJavaOptions": (
            f"-Dlog4j2.configurationFile={log4j.as_uri()} -Dio.netty.tryReflectionSetAccessible=true"
        ),
    }
    if local:  # on a cluster these come from the cluster's spark-defaults.conf (or SPARK_CONF_DIR)
        conf["spark.driver.memory"] = DEFAULT_DRIVER_MEMORY
        conf["spark.sql.shuffle.partitions"] = "4"
        conf["spark.local.dir"] = str(workdir / "local")
        # a sandbox's hostname may not resolve; a local run needs no network beyond loopback
        conf["spark.driver.host"] = "127.0.0.1"
        conf["spark.driver.bindAddress"] = "127.0.0.1"
    for key, value in (spark_conf or {}).items():
        if key == "spark.driver.extraJavaOptions":
            conf[key] = f"{conf[key]} {value}"
        else:
            conf[key] = str(value).lower() if isinstance(value, bool) else str(value)
    active = SparkSession.getActiveSession()
    if active is not None:  # someone else's session in this process: use it, leave it running
        log.info("using the active Spark session on %s; master and spark_conf are ignored", active.sparkContext.master)
        yield active, False
        return
    builder = SparkSession.builder.master(master)
    for key, value in conf.items():
        builder = builder.config(key, value)
    start = time.perf_counter()
    try:
        spark = builder.getOrCreate()
    except Exception as exc:
        raise SparkEngineError(
            f"could not start a Spark session on {master!r}: {type(exc).__name__}: {exc}. "
            f"Spark needs Java 17 (JAVA_HOME or java on PATH) and {INSTALL_HINT}"
        ) from exc
    spark.sparkContext.setLogLevel("ERROR")
    log.info("Spark %s session on %s started in %.1f s", spark.version, master, time.perf_counter() - start)
    try:
        yield spark, True
    finally:
        spark.stop()


def train_spark(
    plays: sp.csr_matrix,
    params: AlsParams | None = None,
    master: str = "local[2]",
    spark_conf: dict[str, Any] | None = None,
    show_progress: bool = True,
    *,
    spark: Any | None = None,
    reg_param: float | None = None,
    blocks: int | None = None,
    checkpoint_dir: str | None = None,
) -> AlsResult:
    """Train implicit ALS with Spark MLlib on a users x tracks CSR of stream counts.

    plays: CSR (n_users, n_items), entries = streams (>= 0; zeros carry no preference).
    params: as for `batch.als.train_als`; `solver` and `cg_steps` do not apply (Spark solves exactly).
    master: Spark master URL (`local[2]`, `spark://host:7077`, `yarn`, ...) for a session started and
        stopped here; spark_conf: extra Spark settings for it (they override playrec's defaults, e.g.
        `{"spark.driver.memory": "2g"}`). Both are ignored when `spark` (an existing SparkSession,
        left running) is given.
    reg_param: Spark's regParam as is; default `spark_reg_param(plays, params.reg, params.reg_exp)`
        (module docstring).
    blocks: numUserBlocks = numItemBlocks; default max(10, the session's default parallelism).
    checkpoint_dir: where ALS checkpoints its lineage every 10 iterations; default a temporary
        directory for local masters and none on a cluster (set one on shared storage for > 30 iterations).

    Returns float32 factors aligned with the CSR's rows and columns (zeros for users and tracks
    without streams), `losses == []` (Spark does not report a loss) and `seconds` = the fit time
    spread evenly over the iterations. Raises `SparkEngineError` when pyspark, pandas/pyarrow or Java
    is missing or Spark fails, `AlsParamsError` for invalid input.
    """
    params = params or AlsParams()
    plays = sp.csr_matrix(plays, dtype=np.float32, copy=True)  # the caller's matrix stays as it is
    plays.eliminate_zeros()
    if plays.data.size and (plays.data.min() < 0 or not np.isfinite(plays.data).all()):
        raise AlsParamsError("plays must be finite and >= 0")
    n_users, n_items = plays.shape
    if max(n_users, n_items) - 1 > MAX_SPARK_ID:
        raise AlsParamsError(f"Spark's ALS takes 32-bit ids; {plays.shape} rows x columns is too many")
    if reg_param is not None and not (reg_param >= 0 and np.isfinite(reg_param)):
        raise AlsParamsError(f"reg_param must be a number >= 0, got {reg_param}")
    if blocks is not None and blocks < 1:
        raise AlsParamsError(f"blocks must be >= 1, got {blocks}")
    regp = spark_reg_param(plays, params.reg, params.reg_exp) if reg_param is None else float(reg_param)
    _import_pyspark()
    workdir = Path(tempfile.mkdtemp(prefix="playrec-spark-"))
    try:
        if spark is not None:
            return _fit(spark, plays, params, regp, blocks, checkpoint_dir)
        with _session(master, spark_conf, show_progress, workdir) as (session, started_here):
            if checkpoint_dir is None and started_here and _is_local(master):
                checkpoint_dir = str(workdir / "checkpoints")
            return _fit(session, plays, params, regp, blocks, checkpoint_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _fit(
    spark: Any,
    plays: sp.csr_matrix,
    params: AlsParams,
    reg_param: float,
    blocks: int | None,
    checkpoint_dir: str | None,
) -> AlsResult:
    import pandas as pd
    from pyspark.ml.recommendation import ALS

    n_users, n_items = plays.shape
    k = params.factors
    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    sc = spark.sparkContext
    if checkpoint_dir is not None:
        sc.setCheckpointDir(checkpoint_dir)
    if blocks is None:
        blocks = max(MIN_ALS_BLOCKS, int(sc.defaultParallelism))
    coo = plays.tocoo()
    frame = pd.DataFrame(
        {
            "user": coo.row.astype(np.int32, copy=False),
            "item": coo.col.astype(np.int32, copy=False),
            "rating": spark_ratings(coo, params),
        }
    )
    log.info(
        "training Spark ALS on %d users x %d items, %d non-zeros: rank %d, maxIter %d, regParam %.6g "
        "(playrec reg %g), alpha %g, %s confidence, %d blocks",
        n_users, n_items, plays.nnz, k, params.iterations, reg_param, params.reg, params.alpha,
        params.confidence, blocks,
    )  # fmt: skip
    start = time.perf_counter()
    with _quiet_pyspark_warnings():
        ratings = spark.createDataFrame(frame, schema="user int, item int, rating float")
    del frame
    als = ALS(
        rank=k,
        maxIter=params.iterations,
        regParam=reg_param,
        alpha=params.alpha,
        implicitPrefs=True,
        nonnegative=False,
        seed=params.seed,
        numUserBlocks=blocks,
        numItemBlocks=blocks,
        userCol="user",
        itemCol="item",
        ratingCol="rating",
        checkpointInterval=10,
    )
    try:
        model = als.fit(ratings)
        fit_s = time.perf_counter() - start
        user_factors = _collect_factors(model.userFactors, n_users, k)
        item_factors = _collect_factors(model.itemFactors, n_items, k)
    except Exception as exc:
        raise SparkEngineError(f"Spark ALS failed: {type(exc).__name__}: {exc}") from exc
    total_s = time.perf_counter() - start
    per_iteration = fit_s / params.iterations if params.iterations else 0.0
    log.info(
        "Spark ALS done: fit %.1f s (%.2f s/iteration, estimated as fit / iterations), %.1f s with the transfers",
        fit_s, per_iteration, total_s,
    )  # fmt: skip
    return AlsResult(
        user_factors=user_factors,
        item_factors=item_factors,
        losses=[],
        seconds=[per_iteration] * params.iterations,
    )


@contextmanager
def _quiet_pyspark_warnings() -> Iterator[None]:
    """pyspark 3.5's pandas bridge calls APIs that newer pandas deprecate; those warnings are not ours."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=r"pyspark\.")
        yield


def _collect_factors(factors: Any, n_rows: int, k: int) -> np.ndarray:
    """Spark's `(id, features: array<float>)` factors as a dense float32 (n_rows, k); absent ids get zeros."""
    from pyspark.sql import functions as sf

    columns = [sf.col("features").getItem(j).alias(f"f{j}") for j in range(k)]
    with _quiet_pyspark_warnings():
        frame = factors.select(sf.col("id"), *columns).toPandas()
    out = np.zeros((n_rows, k), dtype=np.float32)
    if len(frame):
        ids = frame["id"].to_numpy(dtype=np.int64)
        if ids.min() < 0 or ids.max() >= n_rows:
            raise SparkEngineError(f"Spark returned factor ids outside 0..{n_rows - 1}")
        out[ids] = frame[[f"f{j}" for j in range(k)]].to_numpy(dtype=np.float32)
    return out
