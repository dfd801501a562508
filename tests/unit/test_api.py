"""The Python API (playrec.api): each call against the batch functions `playrec train` uses."""

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from batch.als import train_als
from batch.foldin import fold_in_users
from batch.plays import PlaysFileError, read_play_counts
from batch.serving import ServingError, ServingModel, UnknownTrackError, UnknownUserError
from playrec import ALS, ALSModel, ModelStore, PlayCounts, Scored
from playrec.cli import build_parser, main, params_from_args

from .synthetic import random_plays

SMALL = {"factors": 8, "iterations": 4, "reg": 0.5, "seed": 3}


@pytest.fixture(scope="module")
def plays_file(tmp_path_factory):
    plays = random_plays(150, 80, 0.1, seed=5).tocoo()
    lines = ["user,track,plays"] + [f"user{u},track-{i},{int(c)}" for u, i, c in zip(plays.row, plays.col, plays.data)]
    path = tmp_path_factory.mktemp("plays") / "plays.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def counts(plays_file):
    return PlayCounts.from_file(plays_file)


@pytest.fixture(scope="module")
def model(counts):
    return ALS(**SMALL).fit(counts)


def test_from_file_reads_like_train_and_from_arrays_like_the_file(plays_file, counts):
    same = read_play_counts(plays_file)
    assert (counts.user_ids == same.user_ids).all() and (counts.item_ids == same.item_ids).all()
    assert (counts.matrix != same.matrix).nnz == 0
    rows = [line.split(",") for line in plays_file.read_text().splitlines()[1:]]
    users, tracks, plays = zip(*rows)
    arrays = PlayCounts.from_arrays(users, tracks, [float(p) for p in plays])
    assert (arrays.user_ids == counts.user_ids).all() and (arrays.item_ids == counts.item_ids).all()
    assert (arrays.matrix != counts.matrix).nnz == 0
    summed = PlayCounts.from_arrays([1, 1, 2], ["a", "a", "b"], [1, 2, 0])
    assert summed.user_ids.tolist() == ["1", "2"] and summed.matrix.toarray().tolist() == [[3.0, 0.0], [0.0, 0.0]]
    with pytest.raises(PlaysFileError, match="same length"):
        PlayCounts.from_arrays(["u"], ["a", "b"], [1, 2])
    with pytest.raises(PlaysFileError, match=">= 0"):
        PlayCounts.from_arrays(["u"], ["a"], [-1])


def test_als_defaults_are_train_defaults():
    args = build_parser().parse_args(["train", "--plays", "p.csv", "--out", "store"])
    assert ALS().params == params_from_args(args)[0]


def test_fit_returns_the_trained_factors(counts, model):
    result = train_als(counts.matrix, ALS(**SMALL).params, show_progress=False)
    assert isinstance(model, ALSModel) and model.version == "unpublished"
    np.testing.assert_array_equal(model.user_factors, result.user_factors)
    np.testing.assert_array_equal(model.item_factors, result.item_factors)
    with pytest.raises(TypeError, match="PlayCounts"):
        ALS().fit(counts.matrix)


def test_fit_with_tune_trains_the_choice_of_the_same_search_as_train_tune(counts):
    from batch.tuning import TuneSettings, tune

    als = ALS(**SMALL, tune=True, tune_budget=3)
    fitted = als.fit(counts)
    search = tune(counts.matrix, ALS(**SMALL).params, TuneSettings(budget=3), counts.last_played, show_progress=False)
    assert als.tuning is not None and als.tuning.choice == search.choice and len(als.tuning.trials) > 1
    assert fitted.params == search.choice
    result = train_als(counts.matrix, search.choice, show_progress=False)
    np.testing.assert_array_equal(fitted.item_factors, result.item_factors)
    assert ALS(**SMALL, reg_exp=1.0).params.reg_exp == 1.0


def test_recommend_is_the_exact_top_k_without_streamed(counts, model):
    scores = np.asarray(model.user_factors) @ np.asarray(model.item_factors).T
    for user in ("user0", "user7", "user42"):
        row = int(np.flatnonzero(counts.user_ids == user)[0])
        streamed = counts.matrix[row].indices
        masked = scores[row].copy()
        masked[streamed] = -np.inf
        want = counts.item_ids[np.argsort(-masked, kind="stable")[:10]].tolist()
        recs = model.recommend(user, k=10)
        assert len(recs) == 10 and all(isinstance(r, Scored) for r in recs)
        assert [r.track for r in recs] == want
        assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
        assert not {r.track for r in recs} & set(counts.item_ids[streamed].tolist())
        assert len(model.recommend(user, k=10, exclude_streamed=False)) == 10
        extra = model.recommend(user, k=10, exclude={want[0]})
        assert want[0] not in [r.track for r in extra] and [r.track for r in extra][:9] == want[1:10]
    with pytest.raises(UnknownUserError, match="nobody"):
        model.recommend("nobody")


def test_recommend_batch_equals_recommend_per_user(model):
    users = ["user3", "user1", "user99", "user3"]
    together, alone = model.recommend_batch(users, k=7), [model.recommend(u, k=7) for u in users]
    assert [[r.track for r in recs] for recs in together] == [[r.track for r in recs] for recs in alone]
    for a, b in zip(together, alone):  # one matrix product vs matrix-vector products: float32 rounding apart
        assert [r.score for r in a] == pytest.approx([r.score for r in b], rel=1e-6)


def test_similar_ranks_by_cosine(counts, model):
    Y = np.asarray(model.item_factors, np.float64)
    unit = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    cosine = unit @ unit[0]
    cosine[0] = -np.inf
    want = counts.item_ids[np.argsort(-cosine, kind="stable")[:5]].tolist()
    assert [s.track for s in model.similar(str(counts.item_ids[0]), k=5)] == want


def test_fold_in_is_the_exact_half_step(counts, model):
    plays = {"track-3": 4.0, "track-10": 1.0, "track-0": 12.0, "not-a-track": 5.0}
    vector = model.fold_in(plays)
    row = np.zeros((1, len(counts.item_ids)), np.float32)
    for track, n in plays.items():
        if track in model.serving.item_index:
            row[0, model.serving.item_index[track]] = n
    want = fold_in_users(sp.csr_matrix(row), np.asarray(model.item_factors), model.params)[0]
    assert vector.dtype == np.float32 and vector.shape == (8,)
    np.testing.assert_allclose(vector, want, rtol=1e-5, atol=1e-7)
    recs = model.recommend(vector, k=10, exclude=plays)
    assert len(recs) == 10 and not {r.track for r in recs} & set(plays)
    with pytest.raises(UnknownTrackError, match="nothing to fold in"):
        model.fold_in({"not-a-track": 1})


def test_explain_adds_up_to_the_exact_half_step_score(counts, model):
    user, track = "user5", model.recommend("user5", k=1)[0].track
    streamed = model.serving.user_plays(user)
    why = model.explain(user, track, top=len(streamed))
    vector = model.fold_in(streamed)
    score = float(
        vector.astype(np.float64) @ np.asarray(model.item_factors[model.serving.item_index[track]], np.float64)
    )
    assert why["track"] == track and why["score"] == pytest.approx(score, rel=1e-4)
    assert sum(c["contribution"] for c in why["contributions"]) == pytest.approx(why["score"], rel=1e-9)
    assert {c["track"] for c in why["contributions"]} == set(streamed)


def test_evaluate_equals_the_cli_metrics(tmp_path, plays_file, counts, capsys):
    flags = ["--factors", "8", "--iterations", "4", "--reg", "0.5", "--seed", "3"]
    store = tmp_path / "cli"
    assert main(["train", "--plays", str(plays_file), "--out", str(store), *flags, "--no-progress"]) == 0
    manifest = json.loads((store / "models" / ModelStore(store).versions()[-1] / "manifest.json").read_text())
    evaluation = ALS(**SMALL).fit(counts).evaluate(holdout=0.2)
    assert evaluation.model.to_dict() == manifest["metrics"]["model"]
    assert evaluation.popularity.to_dict() == manifest["metrics"]["popularity"]
    assert f"holdout 20%: {evaluation.model.describe()}" in capsys.readouterr().out


def test_publish_load_round_trip(tmp_path, counts, model, capsys):
    model.evaluate(holdout=0.2)
    store = ModelStore(tmp_path / "store")
    version = store.publish(model)
    loaded = store.load()
    assert type(loaded) is type(model) and loaded.version == version and store.versions() == [version]
    np.testing.assert_array_equal(loaded.item_factors, model.item_factors)
    assert loaded.params == model.params
    assert loaded.recommend_batch(["user0", "user9"], k=10) == model.recommend_batch(["user0", "user9"], k=10)
    assert loaded.similar("track-2", k=5) == model.similar("track-2", k=5)
    assert loaded.explain("user0", "track-2") == model.explain("user0", "track-2")
    manifest = store.store.read_manifest(version)
    assert manifest["metrics"]["model"] == model.evaluation.model.to_dict()
    assert manifest["metrics"]["holdout"] == 0.2
    # the CLI and the worker read this store: the same answer through `playrec recommend`
    assert main(["recommend", "user0", "--store", str(store.root), "-k", "10", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)["items"]
    assert [(i["track"], i["score"]) for i in items] == [tuple(r) for r in model.recommend("user0", k=10)]
    assert loaded.evaluate(holdout=0.2) == model.evaluation  # the stored plays evaluate the same


def test_one_search_rule(tmp_path, counts, model):
    store = ModelStore(tmp_path / "store")
    store.publish(model)
    stored = store.store.load()
    auto = ServingModel.load(stored)
    assert auto.dot_index is not None and not auto.uses_forest()  # 80 tracks: exact
    big = ServingModel(stored, auto.plays, (auto.dot_index, auto.cosine_index), exact_scan_items=50)
    assert big.uses_forest()  # more tracks than the threshold: the forest
    assert not ServingModel.load(stored, search="exact").uses_forest()
    assert ServingModel.load(stored, search="forest").uses_forest()
    with pytest.raises(ServingError, match="no forests"):
        ServingModel.load(stored, use_index=False, search="forest")
    forest = store.load(search="forest")
    exact = store.load(search="exact")
    assert [r.track for r in forest.recommend("user0")] == [r.track for r in exact.recommend("user0")]


def test_import_from_any_directory(tmp_path):
    code = "from playrec import ALS, PlayCounts, ModelStore; print(ALS().params.factors)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "40"
