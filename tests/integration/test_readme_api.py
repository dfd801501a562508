"""The README's "Python API" example, run as written against Last.fm 2K (read from ../shared/data or
$PLAYREC_DATA, never copied into the repository), with the real defaults (~5 s), as a script run by
the checkout's interpreter outside the checkout."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("PLAYREC_DATA", ROOT.parent / "shared" / "data"))
README_PATH = "../shared/data/lastfm-2k/user_artists.dat"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Python API\n.*?```python\n(.*?)```", text, flags=re.S | re.M)
    assert match, "README.md has no ```python block under '## Python API'"
    return match.group(1)


#: Appended to the example: what the test checks, written to results.json.
EPILOGUE = """
import json
import numpy as np
import scipy.sparse as sp
from batch.foldin import fold_in_users

row = np.zeros((1, len(counts.item_ids)), np.float32)
row[0, model.serving.item_index["289"]], row[0, model.serving.item_index["72"]] = 3, 1
exact = fold_in_users(sp.csr_matrix(row), np.asarray(model.item_factors), model.params)[0]
with open("results.json", "w") as out:
    json.dump({
        "type": type(model).__name__, "same_type": type(same).__name__, "version": version,
        "same_version": same.version, "recs": recs, "same_recs": same.recommend("2", k=10), "both": both,
        "near": near, "theirs": theirs, "streamed": sorted(model.serving.user_plays("2")),
        "vector": vector.tolist(), "exact": exact.tolist(), "why": why, "metrics": metrics.to_dict(),
    }, out)
"""


def test_the_readme_api_example_runs(tmp_path):
    lastfm = DATA / "lastfm-2k" / "user_artists.dat"
    if not lastfm.is_file():
        pytest.fail(f"{lastfm} is missing: set PLAYREC_DATA to the folder holding lastfm-2k/", pytrace=False)
    code = readme_example()
    assert README_PATH in code
    script = tmp_path / "readme_api.py"
    script.write_text(code.replace(README_PATH, str(lastfm)) + EPILOGUE, encoding="utf-8")
    # the checkout's interpreter, run outside the checkout: `from playrec import ...` must work from anywhere
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True, timeout=300)
    got = json.loads((tmp_path / "results.json").read_text())

    recs = got["recs"]
    assert got["type"] == got["same_type"] == "ALSModel" and got["same_version"] == got["version"]
    assert len(recs) == 10 and [s for _, s in recs] == sorted((s for _, s in recs), reverse=True)
    assert len(got["streamed"]) == 50 and not set(got["streamed"]) & {t for t, _ in recs}
    assert [t for t, _ in got["both"][0]] == [t for t, _ in recs] and len(got["both"][1]) == 10
    assert len(got["near"]) == 10 and "289" not in {t for t, _ in got["near"]}
    np.testing.assert_allclose(got["vector"], got["exact"], rtol=1e-5, atol=1e-7)
    assert len(got["theirs"]) == 10 and not {"289", "72"} & {t for t, _ in got["theirs"]}
    assert got["why"]["track"] == recs[0][0] and got["why"]["contributions"]
    # the README's figures: P@10 0.195, NDCG@10 0.235 on a 20% holdout; popularity P@10 0.068
    model, popularity = got["metrics"]["model"], got["metrics"]["popularity"]
    assert model["precision"] == pytest.approx(0.195, abs=0.005) and model["ndcg"] == pytest.approx(0.235, abs=0.005)
    assert popularity["precision"] == pytest.approx(0.068, abs=0.005)
    assert (tmp_path / "store" / "models" / got["version"] / "manifest.json").is_file()
    assert got["same_recs"] == recs
