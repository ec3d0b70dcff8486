"""Whole-object copies between local files, http(s):// and s3:// (loopback servers): every
direction lands whole, large objects go through multipart uploads, nothing partial stays."""

import pytest

from stacchip import storage
from stacchip.errors import StorageNotFoundError
from tests.processors_support import file_server

SIZE = 12_000_000  # past obstore's 5 MB multipart chunk: more than one part


@pytest.mark.services
def test_copies_in_every_direction(tmp_path, s3_bucket):
    data = bytes(range(256)) * (SIZE // 256)
    (tmp_path / "a.tif").write_bytes(data)
    s3 = f"s3://{s3_bucket}/o"
    with file_server(tmp_path, delay=0.05) as url:
        storage.copy(f"{url}/a.tif", f"{s3}/from-http.tif")  # http -> s3: through a temporary file
        storage.copy(f"{url}/a.tif", str(tmp_path / "from-http.tif"))  # http -> local
        with pytest.raises(StorageNotFoundError, match="missing.tif"):
            storage.copy(f"{url}/missing.tif", f"{s3}/missing.tif")
    storage.copy(f"{s3}/from-http.tif", f"{s3}/same-bucket.tif")  # server-side
    other = f"other-{s3_bucket[5:]}"
    storage.s3_client().create_bucket(Bucket=other)
    storage.copy(f"{s3}/from-http.tif", f"s3://{other}/cross-bucket.tif")  # server-side, between buckets
    storage.copy(f"{s3}/from-http.tif", str(tmp_path / "from-s3.tif"))  # s3 -> local
    storage.copy(str(tmp_path / "from-s3.tif"), f"{s3}/from-local.tif")  # local -> s3 (multipart)
    for url in (f"{s3}/from-http.tif", f"{s3}/same-bucket.tif", f"s3://{other}/cross-bucket.tif",
                f"{s3}/from-local.tif"):
        assert storage.read_bytes(url) == data, url
    for name in ("from-http.tif", "from-s3.tif"):
        assert (tmp_path / name).read_bytes() == data
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert not storage.exists(f"{s3}/missing.tif")


def _row_group_in_child(url, queue):
    import pyarrow.parquet as pq

    from stacchip import storage
    from stacchip.storage import clients

    try:
        f = pq.ParquetFile(storage.open_input(url))
        queue.put((clients.obstore_usable(), f.read_row_group(7).column("a")[0].as_py()))
    except Exception as exc:  # pragma: no cover - reported to the parent
        queue.put((None, repr(exc)))


@pytest.mark.services
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pyarrow_reads_objects_through_the_same_clients(s3_bucket, method):
    """pyarrow reads row groups of an object through open_input (ranged GETs of the client of
    its root, obstore; in a child forked after obstore started, the synchronous client) and
    lists/reads through arrow_filesystem (obstore's fsspec adapter)."""
    import io
    import multiprocessing as mp

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"a": list(range(100_000)), "b": [str(i) for i in range(100_000)]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=10_000)
    url = f"s3://{s3_bucket}/t/x.parquet"
    storage.write_bytes(url, buf.getvalue())
    f = pq.ParquetFile(storage.open_input(url))
    assert f.metadata.num_row_groups == 10 and f.read_row_group(3).column("a")[0].as_py() == 30_000
    fs, path = storage.arrow_filesystem(url)
    assert pq.read_table(path, filesystem=fs).equals(table)
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=_row_group_in_child, args=(url, queue))
    proc.start()
    usable, first = queue.get(timeout=60)
    proc.join(timeout=30)
    assert first == 70_000, first
    assert usable == (method == "spawn")  # a forked child cannot use its parent's obstore runtime
