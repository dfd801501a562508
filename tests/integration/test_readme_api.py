"""The README's "Python API" example, run as written against Last.fm 2K (read from ../shared/data or
$PLAYREC_DATA, never copied into the repository), with the real defaults (~5 s)."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from batch.foldin import fold_in_users

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("PLAYREC_DATA", ROOT.parent / "shared" / "data"))
README_PATH = "../shared/data/lastfm-2k/user_artists.dat"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Python API\n.*?```python\n(.*?)```", text, flags=re.S | re.M)
    assert match, "README.md has no ```python block under '## Python API'"
    return match.group(1)


def test_the_readme_api_example_runs(tmp_path, monkeypatch):
    lastfm = DATA / "lastfm-2k" / "user_artists.dat"
    if not lastfm.is_file():
        pytest.fail(f"{lastfm} is missing: set PLAYREC_DATA to the folder holding lastfm-2k/", pytrace=False)
    code = readme_example()
    assert README_PATH in code
    monkeypatch.chdir(tmp_path)  # ModelStore("store") lands here
    ns: dict = {}
    exec(compile(code.replace(README_PATH, str(lastfm)), "README.md (Python API)", "exec"), ns)

    model, counts, recs = ns["model"], ns["counts"], ns["recs"]
    assert len(recs) == 10 and [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
    streamed = set(model.serving.user_plays("2"))
    assert len(streamed) == 50 and not streamed & {r.track for r in recs}
    assert [r.track for r in ns["both"][0]] == [r.track for r in recs] and len(ns["both"][1]) == 10
    assert len(ns["near"]) == 10 and "289" not in {s.track for s in ns["near"]}
    row = np.zeros((1, len(counts.item_ids)), np.float32)
    row[0, model.serving.item_index["289"]], row[0, model.serving.item_index["72"]] = 3, 1
    exact = fold_in_users(sp.csr_matrix(row), np.asarray(model.item_factors), model.params)[0]
    np.testing.assert_allclose(ns["vector"], exact, rtol=1e-5, atol=1e-7)
    assert len(ns["theirs"]) == 10 and not {"289", "72"} & {r.track for r in ns["theirs"]}
    assert ns["why"]["track"] == recs[0].track and ns["why"]["contributions"]
    # the README's figures: P@10 0.195, NDCG@10 0.235, MPR 6.2% on a 20% holdout
    metrics = ns["metrics"].model
    assert metrics.precision == pytest.approx(0.195, abs=0.005) and metrics.ndcg == pytest.approx(0.235, abs=0.005)
    assert ns["metrics"].popularity.precision < metrics.precision / 2
    same = ns["same"]
    assert type(same) is type(model) and same.version == ns["version"]
    assert (tmp_path / "store" / "models" / ns["version"] / "manifest.json").is_file()
    assert same.recommend("2", k=10) == recs
