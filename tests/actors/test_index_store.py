"""The on-disk index layout: the doc store (parquet + its memory-mapped Arrow copy) and the folder
names of index types."""

import os

import pytest

from actors.beir import Doc
from actors.index_store import DocStore, index_type_tag, shards_dir, trained_path


def _docs(n):
    return [Doc(f"d{i}", f"title {i}", f"text {i} " * (i % 5), "set" if i % 2 else "other") for i in range(n)]


def test_the_doc_store_answers_every_row_from_its_mapped_copy(tmp_path):
    docs = _docs(1000)
    assert DocStore.write(tmp_path / "docs.parquet", docs) == 1000
    assert (tmp_path / "docs.parquet").is_file() and (tmp_path / "docs.arrow").is_file()
    store = DocStore(tmp_path / "docs.parquet")
    assert len(store) == 1000
    for row in (0, 1, 537, 999):
        d = docs[row]
        assert store.hit(row, 0.5, True) == {"doc_id": d.doc_id, "dataset": d.dataset, "score": 0.5, "title": d.title,
                                             "text": d.text}
    assert "text" not in store.hit(3, 0.1, False)
    with pytest.raises(IndexError):
        store.hit(1000, 0.0, False)


def test_a_store_written_before_the_arrow_copy_is_converted_once_and_kept_fresh(tmp_path):
    path = tmp_path / "docs.parquet"
    DocStore.write(path, _docs(10))
    (tmp_path / "docs.arrow").unlink()  # as a store written by an older version
    assert DocStore(path).hit(4, 1.0, False)["doc_id"] == "d4"
    arrow = tmp_path / "docs.arrow"
    stamp = arrow.stat().st_mtime_ns
    os.utime(arrow, ns=(stamp - 10**10, stamp - 10**10))  # copied without times (cp -r): older than the parquet
    stamp = arrow.stat().st_mtime_ns
    DocStore(path)
    assert arrow.stat().st_mtime_ns == stamp  # its fingerprint matches: not converted again
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"doc_id": ["x"], "title": ["t"], "text": [""], "dataset": ["s"]}), str(path))
    store = DocStore(path)  # another parquet: the copy is stale and made again
    assert len(store) == 1 and store.hit(0, 0.0, False)["doc_id"] == "x"
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]  # written under a temporary name, then renamed


def test_processes_opening_a_store_at_once_convert_it_once(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    path = tmp_path / "docs.parquet"
    DocStore.write(path, _docs(3000))
    (tmp_path / "docs.arrow").unlink()
    with ProcessPoolExecutor(4) as pool:
        sizes = list(pool.map(_open_len, [str(path)] * 4))
    assert sizes == [3000] * 4
    assert sorted(os.listdir(tmp_path)) == [".docs.arrow.lock", "docs.arrow", "docs.parquet"]


def _open_len(path: str) -> int:
    return len(DocStore(path))


def test_index_type_folders_are_path_safe_and_distinct(tmp_path):
    assert shards_dir(tmp_path, 2) == tmp_path / "shards-2"  # Flat keeps its folder
    a = shards_dir(tmp_path, 2, "IVF1024,SQ8", 100_000)
    b = shards_dir(tmp_path, 2, "IVF1024,SQ8", 50_000)
    c = shards_dir(tmp_path, 2, "IVF1024_SQ8", 100_000)
    assert len({a, b, c}) == 3 and a.name.startswith("shards-2-IVF1024_SQ8-")
    tag = index_type_tag("OPQ16,IVF64/../x,PQ16", 1)
    assert "/" not in tag and ".." not in tag
    assert trained_path(tmp_path, "HNSW32", 10).parent == tmp_path / "trained"


def test_a_store_on_a_read_only_volume_without_a_fresh_copy_is_loaded_instead(tmp_path, caplog, monkeypatch):
    import errno

    path = tmp_path / "docs.parquet"
    DocStore.write(path, _docs(20))
    stale = tmp_path / "other"
    stale.mkdir()
    DocStore.write(stale / "docs.parquet", _docs(5))
    os.replace(stale / "docs.arrow", tmp_path / "docs.arrow")  # a copy made from another parquet

    def read_only(parquet, arrow):  # what writing there raises (root ignores mode bits)
        raise OSError(errno.EROFS, "Read-only file system", str(arrow))

    monkeypatch.setattr(DocStore, "_convert_once", staticmethod(read_only))
    store = DocStore(path)
    assert len(store) == 20 and store.hit(7, 0.0, False)["doc_id"] == "d7"  # the parquet's rows, not the stale copy's
    assert "loading it into memory" in caplog.text

    def disk_full(parquet, arrow):
        raise OSError(errno.ENOSPC, "No space left on device", str(arrow))

    monkeypatch.setattr(DocStore, "_convert_once", staticmethod(disk_full))
    with pytest.raises(OSError, match="No space"):  # not hidden behind a load of everything into memory
        DocStore(path)
