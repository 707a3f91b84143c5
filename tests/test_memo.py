"""The memo file (one SQLite file per cache folder): runs writing at once lose nothing, an old JSON memo is
ignored, a memo that cannot be written costs only a recheck."""

import json
import os
import subprocess
import sys
import threading

from conftest import ROOT

from pipeline import memo
from pipeline.cache import weights
from pipeline.data.check import CheckMemo

WRITER = """
import sys
from pipeline import memo
db, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
table = memo.Table(db, "checks")  # opened before the other process writes: it does not see those entries
for i in range(n):
    table.put(f"{who}-{i}", {"who": who, "i": i})
    table.put("shared", who)
print("ready", flush=True)
sys.stdin.readline()  # both go at once
print(table.save(), flush=True)
"""


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    db = str(tmp_path / "cache" / memo.NAME)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, db, who, "2000"], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for who in ("a", "b")]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == ["True", "True"] and all(p.returncode == 0 for p in procs)
    got = memo.Table(db, "checks").values
    assert len(got) == 4001 and got["shared"] in ("a", "b")
    assert all(got[f"{w}-{i}"] == {"who": w, "i": i} for w in "ab" for i in range(2000))


def test_threads_with_their_own_connections_lose_nothing(tmp_path):
    db = str(tmp_path / memo.NAME)
    tables = [memo.Table(db, "hashes") for _ in range(4)]
    for k, t in enumerate(tables):
        for i in range(300):
            t.put(f"/{k}/{i}", [k, i])
    go = threading.Barrier(len(tables))
    saved = []
    threads = [threading.Thread(target=lambda t=t: (go.wait(), saved.append(t.save()))) for t in tables]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert saved == [True] * 4
    assert memo.Table(db, "hashes").values == {f"/{k}/{i}": [k, i] for k in range(4) for i in range(300)}
    assert memo.Table(db, "checks").values == {}  # the tables are apart


def test_an_old_json_memo_is_ignored_and_the_memos_share_one_file(tmp_path):
    (tmp_path / "checked-images.json").write_text(json.dumps({"abc:100": "refused"}))
    (tmp_path / "weights-memo.json").write_text("{not json")
    checks = CheckMemo(str(tmp_path / "checked-images.json"), 100)
    assert checks.get("abc") is False  # never checked, as far as the new memo knows
    checks.put("abc", None)
    checks.put_decoded("abc", "truncated")
    checks.save()
    w = weights.Memo(str(tmp_path))
    w.put("fp", "0" * 64, 1280)
    assert sorted(f for f in os.listdir(tmp_path) if not f.endswith(".json")) == [memo.NAME]
    again = CheckMemo(str(tmp_path / "checked-images.json"), 100)
    assert again.get("abc") is None and again.decoded("abc") == "truncated" and again.get("xyz") is False
    assert CheckMemo(str(tmp_path / "checked-images.json"), 200).get("abc") is False  # keyed by MAX_PIXELS too
    assert weights.Memo(str(tmp_path)).get("fp") == ("0" * 64, 1280)


def test_a_memo_that_cannot_be_written_only_costs_a_recheck(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    table = memo.Table(str(blocker / memo.NAME), "checks")  # its folder would be under a file
    table.put("k", 1)
    assert table.save() is False and table.get("k") == 1
    assert memo.Table(str(blocker / memo.NAME), "checks").values == {}


def test_a_copy_holds_what_was_saved_and_a_missing_memo_copies_nothing(tmp_path):
    src, dst = str(tmp_path / "a" / memo.NAME), str(tmp_path / "b" / memo.NAME)
    memo.copy(src, dst)
    assert not os.path.exists(src) and not os.path.exists(dst)
    table = memo.Table(src, "checks")
    table.put("k", "refused")
    assert table.save()
    memo.copy(src, dst)
    assert memo.Table(dst, "checks").values == {"k": "refused"}


def test_a_table_is_read_when_first_looked_up_and_a_put_only_run_keeps_what_others_saved(tmp_path):
    db = str(tmp_path / memo.NAME)
    early = memo.Table(db, "checks")  # opened before anything is saved
    other = memo.Table(db, "checks")
    other.put("a", 1)
    assert other.save()
    assert early.get("a") == 1  # read at the first lookup, not when opened
    writer = memo.Table(db, "checks")
    writer.put("b", 2)  # put only: never reads the table
    assert writer.save()
    assert memo.Table(db, "checks").values == {"a": 1, "b": 2}
