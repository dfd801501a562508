"""`playrec train / recommend / similar` end to end on a small file, through the console script's main()."""

import json

import numpy as np
import pytest

from batch.model_store import ModelStore
from batch.serving import ServingModel
from playrec.cli import main

from .synthetic import random_plays


@pytest.fixture
def plays_file(tmp_path, request):
    plays = random_plays(120, 60, 0.1, seed=4).tocoo()
    request.node.users = {f"user{u}" for u in plays.row}
    lines = ["user\ttrack\tplays"] + [
        f"user{u}\ttrack-{i}\t{int(c)}" for u, i, c in zip(plays.row, plays.col, plays.data)
    ]
    path = tmp_path / "plays.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_publishes_the_contract_files(tmp_path, plays_file, capsys, request):
    store = tmp_path / "store"
    args = [
        "train",
        "--plays",
        str(plays_file),
        "--out",
        str(store),
        "--factors",
        "8",
        "--iterations",
        "3",
        "--alpha",
        "2",
        "--reg",
        "0.5",
        "--reg-exp",
        "1",
        "--seed",
        "3",
        "--confidence",
        "linear",
        "--holdout",
        "0.2",
        "--no-progress",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "holdout 20%: P@10" in out and "popularity: P@10" in out
    version = (store / "models" / "CURRENT").read_text().strip()
    directory = store / "models" / version
    for name in ("user_ids", "item_ids", "user_factors", "item_factors"):
        assert (directory / f"{name}.npy").is_file()
    model = ModelStore(store).load()
    assert set(model.user_ids.tolist()) == request.node.users
    assert all(t.startswith("track-") for t in model.item_ids.tolist())
    assert model.user_factors.shape[1] == 8 and model.user_factors.dtype == np.float32
    params = model.manifest["parameters"]
    assert params["alpha"] == 2 and params["reg"] == 0.5 and params["confidence"] == "linear" and params["seed"] == 3
    assert params["reg_exp"] == 1
    assert model.manifest["metrics"]["model"]["precision"] >= 0

    user = str(model.user_ids[0])
    assert main(["recommend", user, "--store", str(store), "-k", "5", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["user"] == user and len(answer["items"]) == 5
    scores = [item["score"] for item in answer["items"]]
    assert scores == sorted(scores, reverse=True)
    streamed = set(ServingModel.load(model).user_plays(user))
    assert streamed
    assert not streamed & {item["track"] for item in answer["items"]}

    assert any(directory.glob("forest-dot.*")) and any(directory.glob("forest-cosine.*"))
    assert "forest-dot.json" in model.manifest["files"]
    assert main(["recommend", user, "--store", str(store), "-k", "5", "--json", "--search", "forest"]) == 0
    forest = json.loads(capsys.readouterr().out)["items"]  # small data: the forest finds the exact top 5
    assert [i["track"] for i in forest] == [i["track"] for i in answer["items"]]
    assert [i["score"] for i in forest] == pytest.approx([i["score"] for i in answer["items"]], rel=1e-5)
    assert main(["recommend", user, "--store", str(store), "-k", "5", "--json", "--exact"]) == 0
    exact = json.loads(capsys.readouterr().out)["items"]  # 60 tracks: "auto" scores exactly
    assert [i["track"] for i in exact] == [i["track"] for i in answer["items"]]
    assert [i["score"] for i in exact] == [i["score"] for i in answer["items"]]

    assert main(["similar", "track-0", "--store", str(store), "-k", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert main(["recommend", "nobody", "--store", str(store)]) == 3
    assert "unknown user 'nobody'" in capsys.readouterr().err


def test_holdout_zero_skips_evaluation(tmp_path, plays_file, capsys):
    assert (
        main(
            [
                "train",
                "--plays",
                str(plays_file),
                "--out",
                str(tmp_path / "s"),
                "--iterations",
                "1",
                "--factors",
                "4",
                "--holdout",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "P@10" not in out and "published model" in out


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,x,1\nb,y,-2\n")
    assert main(["train", "--plays", str(bad), "--out", str(tmp_path / "s")]) == 2
    assert "bad.csv:2: plays must be a finite number >= 0" in capsys.readouterr().err
    assert main(["recommend", "u", "--store", str(tmp_path / "empty")]) == 2
    assert "no model published" in capsys.readouterr().err
    good = tmp_path / "good.csv"
    good.write_text("a,x,1\nb,y,2\n")
    assert main(["train", "--plays", str(good), "--out", str(tmp_path / "s"), "--reg-exp", "3"]) == 2
    assert "reg_exp must be a number in [0, 2]" in capsys.readouterr().err
    assert (
        main(["train", "--plays", str(good), "--out", str(tmp_path / "s"), "--reg-exp", "0.5", "--engine", "spark"])
        == 2
    )
    assert "--engine spark trains --reg-exp 0 or 1 only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--plays", str(bad), "--out", "x", "--holdout", "1.5"])
