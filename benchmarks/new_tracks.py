"""How well a new track learns from its listeners in the stream (issue #20), on Last.fm 2K.

Protocol (one seed; `--seeds` repeats it and summarises):

1. New tracks: `--new-tracks` (1,000) tracks drawn (seeded) among those with at least
   `--min-listeners` (10) listeners, so every new track keeps >= 2 held-out listeners and >= 8
   streamed ones: more than the worker's `--min-listeners` 5, so the first level (5) covers every
   new track. Each new track's listeners are split (seeded): `--holdout` (20%, at least one) are
   held-out listeners, whose (listener, track) pairs no model sees; the rest are streamed.
2. Stream model: ALS on every play except the new tracks' columns (all their pairs removed; the
   columns are dropped, not left empty). Batch model ("saw the track"): ALS on every play except the
   held-out pairs. Both with `AlsParams()` (`playrec train`'s defaults: 40 factors, 20 iterations,
   log confidence alpha 2, reg 20, CG 3 steps) and `seed` as the ALS seed.
3. Stream fold-in, with the worker's own code: per new track one `stream.track_state.TrackStats`,
   `apply(x_u, version, confidence_weight(count), +1)` for each streamed listener in a seeded random
   order (Last.fm 2K has no timestamps), `solve(X^T X, reg)` against the stream model's user Gram (as
   `LiveModel.user_gram`) after 5, 20, 100 and all listeners. Listeners bring their stream-model
   vectors (the batch-trained `x_u`; the live worker sends the user's latest fold-in, which after a
   stream of known tracks differs a little).
4. (a) Cosine to the batch model's vector of the same track. The two models have different latent
   bases (an unaligned cosine is meaningless and not shown), so the stream side is mapped into the
   batch basis. Scores must be kept: if users map as `x_b = x_s M`, tracks map as `y_s M^-T`
   (`x_s y_s^T = (x_s M)(y_s M^-T)^T`). The least-squares `M = argmin ||X_s M - X_b||` over the users
   with plays in both models is ill-conditioned here (condition number 18-250 over seeds 0-2), and
   `M^-T` blows its weak directions up: the aligned cosine of tracks BOTH models trained is then
   0.09-0.46 (printed as a check). Both models minimise
   `lambda (|X|^2 + |Y|^2)`, whose optimum splits `X Y^T` evenly between the two sides, which leaves
   only an orthogonal freedom; so the map is the orthogonal Procrustes `Q = argmin ||X_s Q - X_b||`,
   `Q^T Q = I` (scores kept, `Q^-T = Q`) and the table's aligned cosine is `cos(y_s Q, y_b)`.
   Ceiling: the same cosine for the known tracks of the pool (>= `--min-listeners` listeners, not
   drawn as new), which both models trained. A basis-free second figure: the cosine of the track's
   scores over those users in the two models (`X_s y_s` vs `X_b y_b`). Check of the half-step: the
   new tracks folded in the same way against the batch model's own users, compared with its vectors.
   (b) MPR (`batch.evaluation.ranking_metrics`, unweighted: the mean over held-out pairs; ties count
   half; 0% = top, 50% = random): each held-out (listener, new track) pair ranks the track among all
   17,632 tracks (known + new) that are not in the listener's training plays, scored by the
   listener's vector. Stream: stream-model user vectors, known tracks' stream-model vectors and the
   new tracks' folded-in vectors at the level (a track with fewer streamed listeners than the level
   keeps its vector at all its listeners, so every level ranks the same pairs as the batch model).
   Batch: the batch model's vectors. "covered pairs" repeats both on the pairs of the tracks that
   reach the level; "among new tracks" ranks the track among the new tracks only, which takes out
   how high the new tracks as a group score against the known ones. That group shift is shown by
   sampled (user, new track) pairs nobody streamed: their mean percentile in each model.
   Target (issue #20): at all listeners, stream MPR <= 1.05 x batch MPR.

    PYTHONPATH=. .venv/bin/python benchmarks/new_tracks.py                  # seeds 0 1 2
    PYTHONPATH=. .venv/bin/python benchmarks/new_tracks.py --seeds 0 --levels 5 10 20 50 100
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LASTFM, Dataset, machine_notes, markdown_table

from batch.als import AlsParams, train_als
from batch.evaluation import ranking_metrics
from batch.plays import read_play_counts
from stream.track_state import TrackStats, confidence_weight

VERSION = "stream-model"  # the model version the listeners' vectors and the statistics belong to


@dataclass
class Split:
    """One seed's new tracks and the two training sets (all CSR users x tracks, the full shape)."""

    new: np.ndarray  # (n_new,) column ids of the new tracks, sorted
    known: np.ndarray  # (n_items - n_new,) column ids of the other tracks, sorted
    pool_known: np.ndarray  # known tracks with >= min_listeners listeners (the pool the new ones came from)
    stream_train: sp.csr_matrix  # every play except the new tracks' (their columns empty)
    batch_train: sp.csr_matrix  # every play except the held-out pairs
    held_out: sp.csr_matrix  # the held-out (listener, new track) pairs
    listeners: list[tuple[np.ndarray, np.ndarray]]  # per new track: streamed users in stream order, streams


def split(plays: sp.csr_matrix, n_new: int, min_listeners: int, holdout: float, seed: int) -> Split:
    """Draw the new tracks, their held-out and streamed listeners and the listener order (seeded)."""
    rng = np.random.default_rng(seed)
    csc = plays.tocsc()
    csc.sort_indices()
    degree = np.diff(csc.indptr)
    pool = np.flatnonzero(degree >= min_listeners)
    if pool.size < n_new:
        raise SystemExit(f"only {pool.size:,} tracks have >= {min_listeners} listeners; ask for fewer new tracks")
    new = np.sort(rng.choice(pool, n_new, replace=False))
    held_rows, held_cols, held_vals = [], [], []
    listeners = []
    for j in new:
        users = csc.indices[csc.indptr[j] : csc.indptr[j + 1]]
        counts = csc.data[csc.indptr[j] : csc.indptr[j + 1]]
        order = rng.permutation(users.size)
        n_held = max(1, round(holdout * users.size))
        held, streamed = order[:n_held], order[n_held:]  # streamed: already in the stream's (random) order
        held_rows.append(users[held])
        held_cols.append(np.full(n_held, j))
        held_vals.append(counts[held])
        listeners.append((users[streamed], counts[streamed]))
    coo = plays.tocoo()
    is_new = np.zeros(plays.shape[1], bool)
    is_new[new] = True
    keep = ~is_new[coo.col]
    stream_train = sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=plays.shape)
    held_out = sp.csr_matrix(
        (np.concatenate(held_vals), (np.concatenate(held_rows), np.concatenate(held_cols))), shape=plays.shape
    )
    batch_train = (plays - held_out).tocsr()
    batch_train.eliminate_zeros()
    assert batch_train.nnz == plays.nnz - held_out.nnz
    return Split(
        new=new,
        known=np.flatnonzero(~is_new),
        pool_known=np.setdiff1d(pool, new),
        stream_train=stream_train,
        batch_train=batch_train,
        held_out=held_out,
        listeners=listeners,
    )


def fold_in_levels(
    listeners: list[tuple[np.ndarray, np.ndarray]], X: np.ndarray, params: AlsParams, levels: list[int]
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Stream each track's listeners into a `TrackStats` and solve at every level.

    X: (n_users, k) float32 user factors the listeners bring. Returns ({level: (n_new, k) float32 vectors
    at min(level, listeners)}, (n_new, k) float32 vectors at all listeners).
    """
    k = X.shape[1]
    gram = np.asarray(X, np.float64).T @ np.asarray(X, np.float64)  # as LiveModel.user_gram
    at_all = np.zeros((len(listeners), k), np.float32)
    at_level = {level: np.zeros((len(listeners), k), np.float32) for level in levels}
    for t, (users, counts) in enumerate(listeners):
        stats = TrackStats(VERSION, k)
        for n, (u, count) in enumerate(zip(users, counts), start=1):
            ok = stats.apply(X[u].astype("<f4").tobytes(), VERSION, confidence_weight(int(count), params), 1.0)
            assert ok
            if n in at_level:
                at_level[n][t] = stats.solve(gram, params.reg)
        at_all[t] = stats.solve(gram, params.reg)
        for level in levels:
            if users.size < level:
                at_level[level][t] = at_all[t]
    return at_level, at_all


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n, k) arrays (float64; 0 where a row is zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.divide(np.einsum("ij,ij->i", a, b), norms, out=np.zeros(len(a)), where=norms > 0)


def least_squares_map(X_s: np.ndarray, X_b: np.ndarray) -> np.ndarray:
    """k x k float64 `M = argmin ||X_s M - X_b||`; item vectors would map as `y_s M^-T` (scores kept)."""
    M, *_ = np.linalg.lstsq(np.asarray(X_s, np.float64), np.asarray(X_b, np.float64), rcond=None)
    return M


def procrustes_map(X_s: np.ndarray, X_b: np.ndarray) -> np.ndarray:
    """k x k orthogonal float64 `Q = argmin ||X_s Q - X_b||`, Q^T Q = I: users and items both map by Q."""
    U, _, Vt = np.linalg.svd(np.asarray(X_s, np.float64).T @ np.asarray(X_b, np.float64))
    return U @ Vt


def run_seed(plays: sp.csr_matrix, params: AlsParams, args: argparse.Namespace, seed: int) -> dict:
    """One seed of the protocol; returns the figures (MPRs and cosines are fractions)."""
    begin = time.perf_counter()
    s = split(plays, args.new_tracks, args.min_listeners, args.holdout, seed)
    streamed = np.array([len(u) for u, _ in s.listeners])
    removed = plays.nnz - s.stream_train.nnz
    print(
        f"seed {seed}: {s.new.size:,} new tracks of {s.new.size + s.pool_known.size:,} with >= {args.min_listeners} "
        f"listeners ({int(np.median(streamed))} streamed listeners at the median, {int(streamed.max())} at most); "
        f"the stream model trains without their {removed:,} pairs ({100 * removed / plays.nnz:.1f}% of "
        f"{plays.nnz:,}); {int(streamed.sum()):,} streamed and {s.held_out.nnz:,} held-out listener pairs",
        flush=True,
    )
    tick = time.perf_counter()
    stream = train_als(s.stream_train[:, s.known], params, compute_loss=False, show_progress=False)
    batch = train_als(s.batch_train, params, compute_loss=False, show_progress=False)
    X_s, X_b, Y_b = stream.user_factors, batch.user_factors, batch.item_factors
    Y_s = np.zeros((plays.shape[1], params.factors), np.float32)  # stream-model tracks by column, new ones 0
    Y_s[s.known] = stream.item_factors
    train_s = time.perf_counter() - tick
    tick = time.perf_counter()
    at_level, at_all = fold_in_levels(s.listeners, X_s, params, args.levels)
    fold_s = time.perf_counter() - tick
    _, same_basis = fold_in_levels(s.listeners, X_b, params, [])  # the half-step against the batch users
    batch_new = Y_b[s.new]

    users = np.flatnonzero(np.diff(s.stream_train.indptr) > 0)  # users with plays in both models
    Q = procrustes_map(X_s[users], X_b[users])
    M = least_squares_map(X_s[users], X_b[users])
    M_inv_t = np.linalg.inv(M).T

    def score_cosine(Y_stream: np.ndarray, Y_batch: np.ndarray) -> np.ndarray:
        """Per track: cosine of its scores over `users` in the two models (no basis involved)."""
        return cosines((X_s[users] @ Y_stream.T).T, (X_b[users] @ Y_batch.T).T)

    pool = s.pool_known
    checks = {
        "users_procrustes": float(np.median(cosines(X_s[users] @ Q, X_b[users]))),
        "users_lstsq": float(np.median(cosines(X_s[users] @ M, X_b[users]))),
        "ceiling": float(np.median(cosines(Y_s[pool] @ Q, Y_b[pool]))),
        "ceiling_mean": float(np.mean(cosines(Y_s[pool] @ Q, Y_b[pool]))),
        "ceiling_lstsq": float(np.median(cosines(Y_s[pool] @ M_inv_t, Y_b[pool]))),
        "new_lstsq": float(np.median(cosines(at_all @ M_inv_t, batch_new))),
        "cond_lstsq": float(np.linalg.cond(M)),
        "ceiling_score": float(np.median(score_cosine(Y_s[pool], Y_b[pool]))),
        "pool_tracks": int(pool.size),
        "same_basis": float(np.median(cosines(same_basis, batch_new))),
        "same_basis_error": float(
            np.max(np.linalg.norm(same_basis - batch_new, axis=1) / np.linalg.norm(batch_new, axis=1))
        ),
    }

    def mpr(X: np.ndarray, Y: np.ndarray, test: sp.csr_matrix, cols: np.ndarray | None = None) -> float:
        if cols is not None:  # rank among these tracks only
            return ranking_metrics(X, Y[cols], s.batch_train[:, cols], test[:, cols]).mpr_unweighted
        return ranking_metrics(X, Y, s.batch_train, test).mpr_unweighted

    tick = time.perf_counter()
    held_csc = s.held_out.tocsc()
    batch_mpr, batch_mpr_new = mpr(X_b, Y_b, s.held_out), mpr(X_b, Y_b, s.held_out, s.new)
    rows = []
    for level in [*args.levels, None]:
        vectors = at_all if level is None else at_level[level]
        covered = np.ones(s.new.size, bool) if level is None else streamed >= level
        Y = Y_s.copy()
        Y[s.new] = vectors
        aligned = cosines(vectors[covered] @ Q, batch_new[covered])
        row = {
            "level": "all" if level is None else str(level),
            "tracks": int(covered.sum()),
            "cos_median": float(np.median(aligned)),
            "cos_mean": float(np.mean(aligned)),
            "score_cos_median": float(np.median(score_cosine(vectors[covered], batch_new[covered]))),
            "stream_mpr": mpr(X_s, Y, s.held_out),
            "batch_mpr": batch_mpr,
            "stream_mpr_new": mpr(X_s, Y, s.held_out, s.new),
            "batch_mpr_new": batch_mpr_new,
        }
        if level is not None and not covered.all():  # the pairs of the tracks that reach the level
            mask = np.zeros(plays.shape[1], np.float32)
            mask[s.new[covered]] = 1.0
            test = (held_csc @ sp.diags(mask)).tocsr()
            test.eliminate_zeros()
            row["covered_pairs"] = test.nnz
            row["covered_stream_mpr"] = mpr(X_s, Y, test)
            row["covered_batch_mpr"] = mpr(X_b, Y_b, test)
        rows.append(row)
    # Do the folded-in tracks rank higher for everyone? Sampled (user, new track) pairs nobody streamed.
    rng = np.random.default_rng(seed + 1_000_003)
    draw = s.held_out.nnz * 2
    pairs = sp.csr_matrix(
        (np.ones(draw, np.float32), (rng.choice(users, draw), rng.choice(s.new, draw))), shape=plays.shape
    )
    pairs.data[:] = 1.0  # duplicates summed: one pair each
    negatives = (pairs - pairs.multiply(plays > 0)).tocsr()
    negatives.eliminate_zeros()
    Y = Y_s.copy()
    Y[s.new] = at_all
    checks["negatives"] = negatives.nnz
    checks["negative_stream"] = mpr(X_s, Y, negatives)
    checks["negative_batch"] = mpr(X_b, Y_b, negatives)
    rank_s = time.perf_counter() - tick
    out = {
        "seed": seed,
        "rows": rows,
        "checks": checks,
        "listener_updates": int(streamed.sum()),
        "seconds": {"train": train_s, "fold_in": fold_s, "rank": rank_s, "total": time.perf_counter() - begin},
    }
    print_seed(out)
    return out


def pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def mpr_pair(stream: float, batch: float) -> str:
    return f"{pct(stream)} / {pct(batch)} (x{stream / batch:.2f})"


def print_seed(r: dict) -> None:
    header = ["listeners", "tracks", "aligned cosine median / mean", "score cosine median"]
    header += ["stream MPR", "batch MPR", "stream / batch", "among new tracks: stream / batch MPR"]
    header += ["covered pairs: stream / batch MPR"]
    table = []
    for row in r["rows"]:
        covered = "-"
        if "covered_pairs" in row:
            covered = f"{row['covered_pairs']:,}: " + mpr_pair(row["covered_stream_mpr"], row["covered_batch_mpr"])
        table.append(
            [
                row["level"],
                f"{row['tracks']:,}",
                f"{row['cos_median']:.3f} / {row['cos_mean']:.3f}",
                f"{row['score_cos_median']:.3f}",
                pct(row["stream_mpr"]),
                pct(row["batch_mpr"]),
                f"x{row['stream_mpr'] / row['batch_mpr']:.2f}",
                mpr_pair(row["stream_mpr_new"], row["batch_mpr_new"]),
                covered,
            ]
        )
    c, sec = r["checks"], r["seconds"]
    print(f"\n### Seed {r['seed']}\n\n{markdown_table(header, table)}\n")
    print(
        f"ceiling, the {c['pool_tracks']:,} known tracks of the pool: aligned cosine median {c['ceiling']:.3f} "
        f"(mean {c['ceiling_mean']:.3f}), score cosine median {c['ceiling_score']:.3f}; users X_s Q ~ X_b: "
        f"median cosine {c['users_procrustes']:.3f}"
    )
    print(
        f"least-squares map M instead of Q: users fit better (median cosine {c['users_lstsq']:.3f}) but M has "
        f"condition number {c['cond_lstsq']:.0f}, so y M^-T is dominated by M's weakest directions: aligned "
        f"cosine of the known pool {c['ceiling_lstsq']:.3f}, new tracks at all listeners {c['new_lstsq']:.3f}"
    )
    print(
        f"half-step check, new tracks folded in against the batch model's own users (same basis): cosine median "
        f"{c['same_basis']:.5f}, largest relative difference {c['same_basis_error']:.2e}"
    )
    print(
        f"{c['negatives']:,} sampled (user, new track) pairs nobody streamed, at all listeners: mean percentile "
        f"stream {pct(c['negative_stream'])}, batch {pct(c['negative_batch'])} (lower = the new tracks rank higher "
        f"for everyone)"
    )
    final = r["rows"][-1]
    ratio = final["stream_mpr"] / final["batch_mpr"]
    print(
        f"target at all listeners, stream MPR <= 1.05 x batch MPR: {'met' if ratio <= 1.05 else 'NOT met'} "
        f"(x{ratio:.2f}; among the new tracks only x{final['stream_mpr_new'] / final['batch_mpr_new']:.2f})"
    )
    print(
        f"time: train both models {sec['train']:.1f} s, {r['listener_updates']:,} listener updates + solves "
        f"{sec['fold_in']:.1f} s, ranking {sec['rank']:.1f} s, seed total {sec['total']:.1f} s\n",
        flush=True,
    )


def print_summary(results: list[dict]) -> None:
    seeds = " / ".join(str(r["seed"]) for r in results)
    header = ["listeners", "tracks", "aligned cosine median", "stream MPR", "batch MPR", "stream / batch"]
    header += [f"ratio, seeds {seeds}", "among new tracks: stream / batch"]
    table = []
    for i, row in enumerate(results[0]["rows"]):
        per = [r["rows"][i] for r in results]
        ratios = [p["stream_mpr"] / p["batch_mpr"] for p in per]
        table.append(
            [
                row["level"],
                " / ".join(f"{p['tracks']:,}" for p in per),
                f"{statistics.median(p['cos_median'] for p in per):.3f}",
                pct(statistics.median(p["stream_mpr"] for p in per)),
                pct(statistics.median(p["batch_mpr"] for p in per)),
                f"x{statistics.median(ratios):.2f}",
                " / ".join(f"x{x:.2f}" for x in ratios),
                f"x{statistics.median(p['stream_mpr_new'] / p['batch_mpr_new'] for p in per):.2f}",
            ]
        )
    print(f"### Summary over seeds {seeds} (medians over the seeds)\n\n{markdown_table(header, table)}\n")
    med = {key: statistics.median(r["checks"][key] for r in results) for key in results[0]["checks"]}
    print(
        f"ceiling (known pool, aligned cosine) {med['ceiling']:.3f}; non-listener pairs' mean percentile of the new "
        f"tracks stream {pct(med['negative_stream'])} vs batch {pct(med['negative_batch'])}"
    )
    final = [r["rows"][-1]["stream_mpr"] / r["rows"][-1]["batch_mpr"] for r in results]
    met = sum(x <= 1.05 for x in final)
    print(f"target at all listeners (stream MPR <= 1.05 x batch MPR): met for {met} of {len(final)} seeds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plays", type=Path, default=LASTFM, help=f"Last.fm 2K user_artists.dat (default {LASTFM})")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default 0 1 2)")
    ap.add_argument("--new-tracks", type=int, default=1000, help="tracks held back as new (default 1000)")
    ap.add_argument("--min-listeners", type=int, default=10, help="listeners a new track needs (default 10)")
    ap.add_argument("--holdout", type=float, default=0.2, help="share of a new track's listeners held out (0.2)")
    ap.add_argument("--levels", type=int, nargs="+", default=[5, 20, 100], help="listener counts (default 5 20 100)")
    args = ap.parse_args()
    args.levels = sorted(set(args.levels))
    if not 0 < args.holdout < 1 or min(args.levels) < 1:
        raise SystemExit("--holdout must be in (0, 1) and --levels >= 1")
    ds = Dataset(f"Last.fm 2K ({args.plays.name})", read_play_counts(args.plays).matrix.astype(np.float32))
    plays = sp.csr_matrix(ds.plays, dtype=np.float32)
    params = AlsParams()
    print(f"# New tracks in the stream (issue #20)\n\n{machine_notes()}\n{ds.describe()}\nALS {params.to_dict()}\n")
    begin = time.perf_counter()
    results = []
    for seed in args.seeds:
        results.append(run_seed(plays, dataclasses.replace(params, seed=seed), args, seed))
    if len(results) > 1:
        print_summary(results)
    print(f"\ntotal {time.perf_counter() - begin:.1f} s for {len(results)} seed(s)")


if __name__ == "__main__":
    main()
