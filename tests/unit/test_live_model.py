"""The stream's LiveModel: exact fold-in against a published model, new tracks, queries."""

import numpy as np
import pytest
import scipy.sparse as sp

from batch.als import AlsParams
from batch.confidence import confidence_matrix
from batch.model_store import ModelStore
from batch.training import train_and_publish
from stream.live_model import LiveModel, UnknownTrackError

from .synthetic import random_plays, synthetic_counts
from .test_als import reference_half_step

PARAMS = AlsParams(factors=8, iterations=5, alpha=1.0, reg=0.1, seed=1)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    plays = random_plays(200, 120, 0.06, seed=8)
    counts = synthetic_counts(plays)
    store = ModelStore(tmp_path_factory.mktemp("store"))
    train_and_publish(counts, store, PARAMS, holdout=0, show_progress=False)
    return store, plays


def user_counts(plays: sp.csr_matrix, row: int) -> dict:
    start, stop = plays.indptr[row], plays.indptr[row + 1]
    return {f"t{j}": float(c) for j, c in zip(plays.indices[start:stop], plays.data[start:stop])}


def test_fold_in_users_equals_the_half_step(published):
    store, plays = published
    live = LiveModel(store.load(), use_index=False)
    rows = [int(r) for r in np.flatnonzero(np.diff(plays.indptr) > 0)[[0, 17, -1]]]
    vectors = live.fold_in_users({f"u{r}": user_counts(plays, r) for r in rows} | {"ghost": {"t-new": 3.0}})
    assert set(vectors) == {f"u{r}" for r in rows}  # "ghost" streamed only an unknown track
    cm1 = confidence_matrix(plays, PARAMS.alpha, PARAMS.confidence, PARAMS.eps)
    want = reference_half_step(cm1[rows], np.asarray(live.model.item_factors), PARAMS.reg)
    got = np.stack([vectors[f"u{r}"] for r in rows])
    assert (np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)).max() < 1e-4


def test_new_track_fold_in_and_recommendation(published):
    store, _ = published
    live = LiveModel(store.load(), use_index=False)
    X = np.asarray(live.model.user_factors)
    listeners = np.array([3, 9, 27, 81, 100])
    counts = np.array([5.0, 1.0, 2.0, 8.0, 3.0], np.float32)
    solved = live.fold_in_tracks({"fresh": (X[listeners], counts)})
    cm1 = sp.csr_matrix((np.log1p(counts), (np.zeros(5, int), listeners)), shape=(1, X.shape[0]), dtype=np.float32)
    want = reference_half_step(cm1, X, PARAMS.reg)[0]
    assert np.linalg.norm(solved["fresh"] - want) / np.linalg.norm(want) < 1e-4
    before = live.item_gram.copy()
    live.add_tracks(solved)
    assert "fresh" in live and live.new_ids == ["fresh"]
    np.testing.assert_allclose(live.item_gram - before, np.outer(solved["fresh"], solved["fresh"]), atol=1e-9)
    # a new track is recommendable at once: a loud one tops a query along its direction
    loud = solved["fresh"] / np.linalg.norm(solved["fresh"]) * 100
    live.add_tracks({"loud": loud})
    assert live.recommend_vector(loud, k=3)[0].track == "loud"
    assert "fresh" in [s.track for s in live.recommend_vector(solved["fresh"], k=200)]
    assert "fresh" not in [s.track for s in live.recommend_vector(solved["fresh"], k=3, exclude={"fresh"})]
    assert live.similar("fresh", 2)[0].track != "fresh"
    # user fold-in now includes plays of the new track
    vec = live.fold_in_users({"newbie": {"fresh": 4.0}})
    assert "newbie" in vec and float(vec["newbie"] @ solved["fresh"]) > 0
    # re-solving replaces the vector without duplicating the track
    live.add_tracks({"fresh": solved["fresh"] * 0.5})
    assert live.new_ids == ["fresh", "loud"]
    stored = live.new_vectors.astype(np.float64)  # fresh * 0.5 and loud, as float32
    np.testing.assert_allclose(stored[0], solved["fresh"] * 0.5, rtol=1e-6)
    expected = before + stored.T @ stored  # before: the gram without any new track
    np.testing.assert_allclose(live.item_gram, expected, rtol=1e-7, atol=1e-6)


def test_popularity_and_explanation(published):
    store, plays = published
    live = LiveModel(store.load(), use_index=False)
    listeners = np.bincount(plays.indices, minlength=120)
    popular = live.popular_for(5)
    assert popular[0].track == f"t{int(np.argmax(listeners))}" and popular[0].score == listeners.max()
    assert popular[0].track not in [p.track for p in live.popular_for(5, exclude={popular[0].track})]
    counts = user_counts(plays, 4)
    vector = live.fold_in_users({"u4": counts})["u4"]
    target = live.recommend_vector(vector, 1, exclude=counts)[0]
    explanation = live.explain_counts(counts, target.track)
    assert explanation["score"] == pytest.approx(target.score, rel=1e-3)
    assert (
        sum(c["contribution"] for c in explanation["contributions"]) <= explanation["score"] + 1e-6 or len(counts) > 10
    )
    with pytest.raises(UnknownTrackError):
        live.similar("nope")


def test_incremental_fold_in_equals_a_rebuild(published):
    """Cached systems updated with a batch's plays give the same vectors as solving from all counts."""
    from stream.live_model import UserChange

    store, _plays = published
    live = LiveModel(store.load(), use_index=False)
    fresh = LiveModel(store.load(), use_index=False)
    rng = np.random.default_rng(4)
    counts = {"a": {"t1": 3.0, "t2": 1.0}, "b": {"t5": 2.0, "unknown-x": 4.0}}
    offsets = {"a": 10, "b": 20}
    first = live.fold_in_users(counts, {u: UserChange(-1, offsets[u], {}) for u in counts})
    for _step in range(5):
        changes = {}
        for user in counts:
            added = {f"t{int(rng.integers(0, 30))}": int(rng.integers(1, 3)) for _ in range(3)}
            changes[user] = _apply(counts, offsets, user, added, step=5)
        got = live.fold_in_users(counts, changes)
        want = fresh.fold_in_users(counts)
        for user in counts:
            np.testing.assert_allclose(got[user], want[user], rtol=1e-5, atol=1e-7)
        assert all(live.cached_offset(u) == offsets[u] for u in counts)
    assert set(first) == {"a", "b"}
    # a change that does not follow the cached offset rebuilds from all counts (still exact)
    counts["a"]["t3"] = counts["a"].get("t3", 0.0) + 1
    got = live.fold_in_users(counts, {"a": UserChange(999, 1000, {"t3": (1, counts["a"]["t3"])})})
    np.testing.assert_allclose(got["a"], fresh.fold_in_users({"a": counts["a"]})["a"], rtol=1e-5, atol=1e-7)
    # a folded-in track's vector invalidates the systems that count it
    live.add_tracks({"unknown-x": np.ones(live.k, np.float32)})
    fresh.add_tracks({"unknown-x": np.ones(live.k, np.float32)})
    assert live.cached_offset("b") is None
    counts["b"]["t1"] = counts["b"].get("t1", 0.0) + 1
    got = live.fold_in_users(counts, {"b": UserChange(offsets["b"], offsets["b"] + 1, {"t1": (1, counts["b"]["t1"])})})
    np.testing.assert_allclose(got["b"], fresh.fold_in_users({"b": counts["b"]})["b"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("use_index", [True, False])
def test_taken_down_tracks_are_never_answered_until_restored(published, use_index):
    store, _ = published
    live = LiveModel(store.load(), use_index=use_index, exact_scan_items=0)  # the forests when loaded
    rng = np.random.default_rng(0)
    users = rng.standard_normal((20, live.k)).astype(np.float32)
    before = [[s.track for s in live.recommend_vector(u, 10)] for u in users]
    top = sorted({t for recs in before for t in recs})[:5]
    similar_to = [s.track for s in live.similar(before[1][0], 10)]
    live.take_down([*top, "not-yet-known", similar_to[0]])
    for u in users:
        assert not {s.track for s in live.recommend_vector(u, 10)} & live.taken_down
        assert len(live.recommend_vector(u, 10)) == 10
    assert not {s.track for s in live.popular_for(50)} & live.taken_down
    if before[1][0] not in live.taken_down:
        assert similar_to[0] not in [s.track for s in live.similar(before[1][0], 10)]
    with pytest.raises(UnknownTrackError, match="taken down"):
        live.similar(top[0], 5)
    live.restore([*top, "not-yet-known", similar_to[0]])
    assert not live.taken_down
    assert [[s.track for s in live.recommend_vector(u, 10)] for u in users] == before
    # a new track taken down before it is folded in stays hidden when it arrives
    live.take_down(["brand-new"])
    live.add_tracks({"brand-new": users[0] * 10})
    assert "brand-new" not in [s.track for s in live.recommend_vector(users[0], 10)]
    live.restore(["brand-new"])
    assert live.recommend_vector(users[0], 1)[0].track == "brand-new"


def test_system_cache_is_lru_bounded_and_stays_exact(published):
    """More active users than cache slots: the least recently used are evicted and rebuilt, never wrong."""
    from stream.live_model import UserChange

    store, _plays = published
    live = LiveModel(store.load(), use_index=False, system_cache_users=2)
    fresh = LiveModel(store.load(), use_index=False)
    counts = {u: {"t1": 1.0, f"t{i + 2}": 2.0} for i, u in enumerate(["a", "b", "c"])}
    offsets = dict.fromkeys(counts, 0)
    for step in range(4):
        batch = ["a", "b", "c"] if step % 2 == 0 else ["c", "a"]
        changes = {}
        for user in batch:
            track = f"t{(step * 3 + len(user)) % 20}"
            counts[user][track] = counts[user].get(track, 0.0) + 1
            changes[user] = UserChange(offsets[user], offsets[user] + 1, {track: (1, counts[user][track])})
            offsets[user] += 1
        got = live.fold_in_users({u: counts[u] for u in batch}, changes)
        want = fresh.fold_in_users({u: counts[u] for u in batch})
        for user in batch:
            np.testing.assert_allclose(got[user], want[user], rtol=1e-5, atol=1e-7)
        cached = [u for u in counts if live.cached_offset(u) is not None]
        assert len(cached) <= 2
        assert all(live.cached_offset(u) == offsets[u] for u in cached)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_incremental_fold_in_in_chunks_equals_a_rebuild(published, monkeypatch, chunk):
    """Cached users are updated and solved a chunk at a time (sorted by batch degree): still exact, and
    a user whose batch only played unknown tracks keeps its system."""
    import stream.live_model as lm
    from stream.live_model import UserChange

    monkeypatch.setattr(lm, "FOLD_CHUNK_USERS", chunk)
    store, _plays = published
    live = LiveModel(store.load(), use_index=False)
    fresh = LiveModel(store.load(), use_index=False)
    rng = np.random.default_rng(7)
    users = [f"u{i}" for i in range(7)]
    counts = {u: {f"t{int(rng.integers(0, 30))}": 1.0} for u in users}
    offsets = dict.fromkeys(users, 0)
    live.fold_in_users(counts, {u: UserChange(-1, 0, {}) for u in users})
    for _step in range(4):
        changes = {}
        for i, user in enumerate(users):
            added = {f"t{int(rng.integers(0, 30))}": int(rng.integers(1, 3)) for _ in range(i % 4)}
            if i == 6:
                added = {"not-known-yet": 1}
            changes[user] = _apply(counts, offsets, user, added)
        got = live.fold_in_users(counts, changes)
        want = fresh.fold_in_users(counts)
        assert set(got) == set(want)
        for user in users:
            np.testing.assert_allclose(got[user], want[user], rtol=1e-5, atol=1e-7)
            assert live.cached_offset(user) == offsets[user]


def test_change_carries_full_counts(published):
    """`LiveModel.change`: streams added and the full count after (training + streamed) per track."""
    store, _plays = published
    live = LiveModel(store.load(), use_index=False)
    user = next(iter(live.user_index))
    counts = {"t1": 3, "zz-new": 1}
    change = live.change(user, 4, 9, {"t1": 2, "zz-new": 1}, counts)
    assert (change.before, change.after) == (4, 9)
    assert change.added == {t: (n, live.full_count(user, t, counts[t])) for t, n in {"t1": 2, "zz-new": 1}.items()}
    assert live.change("nobody", -1, 0, {"t1": 1}, {"t1": 1}).added == {"t1": (1, 1.0)}


def _apply(counts, offsets, user, added, step=1):
    """Add `added` {track: streams} to the user's counts and move their offset by `step`: the UserChange."""
    from stream.live_model import UserChange

    for track, n in added.items():
        counts[user][track] = counts[user].get(track, 0.0) + n
    change = UserChange(offsets[user], offsets[user] + step, {t: (n, counts[user][t]) for t, n in added.items()})
    offsets[user] += step
    return change


def _play_batch(rng, users, counts, offsets, n_tracks=40, most=3):
    """One batch of 0..most plays of known tracks per user: updates counts/offsets, returns the changes."""
    changes = {}
    for user in users:
        added: dict[str, int] = {}
        for _ in range(int(rng.integers(0, most + 1))):
            track = f"t{int(rng.integers(0, n_tracks))}"
            added[track] = added.get(track, 0) + int(rng.integers(1, 3))
        changes[user] = _apply(counts, offsets, user, added)
    return changes


def _count_rebuilds(live, monkeypatch):
    """Users rebuilt from full counts, per call (both rebuild paths read them through `_full_plays`)."""
    calls = []
    original = live._full_plays

    def counting(counts):
        calls.append(sorted(counts))
        return original(counts)

    monkeypatch.setattr(live, "_full_plays", counting)
    return calls


@pytest.mark.parametrize("log_max", [64, 2])
def test_cached_inverses_catch_up_with_gram_changes(published, monkeypatch, log_max):
    """New and re-solved tracks change G for every user: cached inverses apply the missed changes (or,
    past GRAM_LOG_MAX of them, are rebuilt from full counts) and stay equal to a from-scratch solve."""
    import stream.live_model as lm
    from stream.live_model import UserChange

    monkeypatch.setattr(lm, "GRAM_LOG_MAX", log_max)
    store, _plays = published
    live, fresh = LiveModel(store.load(), use_index=False), LiveModel(store.load(), use_index=False)
    rng = np.random.default_rng(11)
    users = [f"u{i}" for i in range(6)]
    counts = {u: {f"t{i}": 2.0} for i, u in enumerate(users)}
    offsets = dict.fromkeys(users, 0)
    live.fold_in_users(counts, {u: UserChange(-1, 0, {}) for u in users})
    rebuilds = _count_rebuilds(live, monkeypatch)
    new = {f"n{j}": rng.standard_normal(live.k).astype(np.float32) for j in range(3)}
    for model in (live, fresh):
        model.add_tracks(new)  # 3 changes: within a log of 64, beyond a log of 2
        model.add_tracks({"n0": new["n0"] * 0.5})  # re-solved: -old old^T + new new^T
    changes = _play_batch(rng, users, counts, offsets)
    got, want = live.fold_in_users(counts, changes), fresh.fold_in_users(counts)
    for user in users:
        np.testing.assert_allclose(got[user], want[user], rtol=1e-6, atol=1e-8)
        assert live.cached_offset(user) == offsets[user]
    assert rebuilds == ([] if log_max == 64 else [users])
    # caught up: the next batch is incremental again and exact
    changes = _play_batch(rng, users, counts, offsets)
    got, want = live.fold_in_users(counts, changes), fresh.fold_in_users(counts)
    for user in users:
        np.testing.assert_allclose(got[user], want[user], rtol=1e-6, atol=1e-8)
    assert len(rebuilds) == (0 if log_max == 64 else 1)


def test_long_runs_of_rank_one_updates_stay_exact(published, monkeypatch):
    """Hundreds of Sherman-Morrison updates per cached inverse: still a from-scratch solve to 1e-6;
    past REFRESH_UPDATES a user is rebuilt from full counts (rounding never accumulates unbounded)."""
    import stream.live_model as lm
    from stream.live_model import UserChange

    monkeypatch.setattr(lm, "REFRESH_UPDATES", 150)
    store, _plays = published
    live, fresh = LiveModel(store.load(), use_index=False), LiveModel(store.load(), use_index=False)
    rng = np.random.default_rng(5)
    users = [f"u{i}" for i in range(5)]
    counts = {u: {"t1": 1.0} for u in users}
    offsets = dict.fromkeys(users, 0)
    live.fold_in_users(counts, {u: UserChange(-1, 0, {}) for u in users})
    rebuilds = _count_rebuilds(live, monkeypatch)
    for step in range(120):
        changes = _play_batch(rng, users, counts, offsets, n_tracks=120, most=4)
        got = live.fold_in_users(counts, changes)
        if step % 20 == 19:
            want = fresh.fold_in_users(counts)
            for user in users:
                np.testing.assert_allclose(got[user], want[user], rtol=1e-6, atol=1e-8)
    assert rebuilds, "no user reached REFRESH_UPDATES"
    assert all(live._updates[live._slot_of[u]] < 150 for u in users)


@pytest.mark.parametrize("build_tracks", [0, 3, 24])
def test_rebuilt_inverses_by_rank_one_steps_equal_a_solve(published, monkeypatch, build_tracks):
    """A rebuilt user's cached inverse comes from (G + reg I)^-1 by rank-one steps (few tracks) or from an
    assembled, inverted system (many): both give the from-scratch solution, now and after more plays."""
    import stream.live_model as lm
    from stream.live_model import UserChange

    monkeypatch.setattr(lm, "SM_BUILD_TRACKS", build_tracks)
    store, plays = published
    live, fresh = LiveModel(store.load(), use_index=False), LiveModel(store.load(), use_index=False)
    rows = [int(r) for r in np.flatnonzero(np.diff(plays.indptr) > 0)[:12]]
    counts = {f"u{r}": user_counts(plays, r) for r in rows} | {"ghost": {"t-new": 2.0}, "empty": {}}
    got = live.fold_in_users(counts, {u: UserChange(-1, 0, {}) for u in counts})
    want = fresh.fold_in_users(counts)
    assert set(got) == set(want) == {f"u{r}" for r in rows}
    for user in want:
        np.testing.assert_allclose(got[user], want[user], rtol=1e-6, atol=1e-8)
        assert live.cached_offset(user) == 0
    rng = np.random.default_rng(2)
    offsets = dict.fromkeys(counts, 0)
    changes = _play_batch(rng, list(counts), counts, offsets, n_tracks=120)
    got, want = live.fold_in_users(counts, changes), fresh.fold_in_users(counts)
    for user in want:
        np.testing.assert_allclose(got[user], want[user], rtol=1e-6, atol=1e-8)


def test_on_solved_reports_rebuilt_users_first_then_each_chunk(published, monkeypatch):
    """`on_solved` sees every solution once, as soon as its group is solved: rebuilt (new) users first."""
    import stream.live_model as lm
    from stream.live_model import UserChange

    monkeypatch.setattr(lm, "FOLD_CHUNK_USERS", 2)
    store, _plays = published
    live = LiveModel(store.load(), use_index=False)
    rng = np.random.default_rng(3)
    cached = [f"c{i}" for i in range(5)]
    counts = {u: {f"t{i}": 1.0} for i, u in enumerate(cached)}
    offsets = dict.fromkeys(cached, 0)
    live.fold_in_users(counts, {u: UserChange(-1, 0, {}) for u in cached})
    changes = _play_batch(rng, cached, counts, offsets)
    for user in ("new-1", "new-2"):
        counts[user] = {"t3": 2.0}
        changes[user] = UserChange(-1, 0, {"t3": (2, 2.0)})
    groups: list[dict] = []
    out = live.fold_in_users(counts, changes, on_solved=groups.append)
    assert set(groups[0]) == {"new-1", "new-2"}
    assert all(len(g) <= 2 for g in groups[1:])
    merged = {u: v for g in groups for u, v in g.items()}
    assert sum(len(g) for g in groups) == len(merged) == len(out)
    for user, vector in out.items():
        np.testing.assert_array_equal(merged[user], vector)
