"""playrec stores only npy / json / msgpack: no pickle, no eval, and np.load always refuses pickled objects."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = re.compile(
    r"^\s*(import (c?pickle|dill|shelve|marshal)\b|from (c?pickle|dill|shelve|marshal) import)|allow_pickle\s*=\s*True"
    r"|\beval\(|\bexec\(",
    re.MULTILINE,
)


def test_no_pickle_or_eval_in_the_sources():
    offenders = []
    for folder in ("batch", "index", "stream", "playrec", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == Path(__file__).name:
                continue
            for match in FORBIDDEN.finditer(path.read_text(encoding="utf-8")):
                line = path.read_text(encoding="utf-8")[: match.start()].count("\n") + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {match.group(0).strip()}")
    assert not offenders, "pickle/eval found:\n" + "\n".join(offenders)


def test_every_np_load_refuses_pickles():
    loads = []
    for folder in ("batch", "index", "stream", "playrec"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for match in re.finditer(r"np\.load\((?:[^()]|\([^()]*\))*\)", text):
                loads.append((path.relative_to(ROOT), match.group(0)))
    assert loads, "expected np.load calls to check"
    missing = [f"{p}: {call}" for p, call in loads if "allow_pickle=False" not in call]
    assert not missing, "np.load without allow_pickle=False:\n" + "\n".join(missing)
