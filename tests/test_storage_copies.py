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
