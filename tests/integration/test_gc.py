"""castore gc --dry-run: the survey of what no root reaches (the sweep is
not built yet; docs/design.md, "Writers and gc")."""
import json
import os

from conftest import pattern_bytes, run


def make_tree(path, seed):
    """A tree with a big and a small file of its own and two shared ones."""
    (path / "own").mkdir(parents=True)
    (path / "own" / "big.bin").write_bytes(pattern_bytes(300000, seed))
    (path / "own" / "small.txt").write_bytes(pattern_bytes(700, seed))
    (path / "shared.bin").write_bytes(pattern_bytes(200000, 250))
    (path / "shared.txt").write_bytes(pattern_bytes(900, 250))
    return path


def store_state(store):
    """Every file of the store with its size and mtime (but LMDB's lock
    file, which any open touches)."""
    state = {}
    for root, _, files in os.walk(store):
        for f in files:
            if f == "lock.mdb":
                continue
            st = os.lstat(os.path.join(root, f))
            state[os.path.join(root, f)] = (st.st_size, st.st_mtime_ns)
    return state


def survey(store):
    p = run(["gc", "--dry-run", "--json"], store=store)
    return json.loads(p.stdout)


def test_gc_dry_run_counts_what_a_removed_root_alone_reached(tmp_path):
    store = tmp_path / "store"
    for name, seed in (("a", 1), ("b", 2)):
        run(["import", make_tree(tmp_path / name, seed), "--name", name],
            store=store)
    got = survey(store)
    assert got["objects"] == 0 and got["bytes"] == 0, got
    assert got["reachable"] >= 8
    run(["roots", "rm", "a"], store=store)
    before = store_state(store)
    got = survey(store)
    assert set(got) == {
        "dry_run", "reachable", "objects", "bytes", "blob_files",
        "blob_file_bytes", "small_blobs", "small_blob_bytes", "directories",
        "directory_bytes", "tmp_files", "tmp_bytes"}
    assert got["dry_run"] is True
    # a's own big blob is a file, its small one packed; its two Directories
    # (the root and own/) are reached by nothing else.
    assert got["blob_files"] == 1 and got["blob_file_bytes"] == 300000, got
    assert got["small_blobs"] == 1 and got["small_blob_bytes"] == 700, got
    assert got["directories"] == 2, got
    assert got["objects"] == 4
    assert got["bytes"] == 300700 + got["directory_bytes"]
    line = run(["gc", "--dry-run"], store=store).stdout.decode()
    assert "would remove 4 objects" in line, line
    # The survey changed nothing, and what b reaches is whole.
    assert store_state(store) == before
    run(["verify"], store=store)
    out = tmp_path / "out"
    run(["export", "b", out], store=store)
    assert (out / "own" / "big.bin").read_bytes() == pattern_bytes(300000, 2)


def test_gc_counts_tmp_leftovers_and_refuses_to_remove(tmp_path):
    store = tmp_path / "store"
    run(["import", make_tree(tmp_path / "a", 1), "--name", "a"], store=store)
    (store / "tmp" / "leftover").write_bytes(b"x" * 1234)
    got = survey(store)
    assert got["tmp_files"] >= 1 and got["tmp_bytes"] >= 1234, got
    p = run(["gc"], store=store, check=False)
    assert p.returncode == 2
    assert p.stderr.decode().startswith("castore gc: "), p.stderr
    assert (store / "tmp" / "leftover").exists()
