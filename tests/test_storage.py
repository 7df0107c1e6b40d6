"""Datasets: parts + manifest written last, readers see only what a manifest lists; local and s3://."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from synth_core.config import StorageConfig
from synth_core.storage import (
    DatasetError,
    OnePart,
    StorageError,
    WriterLock,
    WriterLockError,
    check_writable,
    commit_dataset,
    compute_funnel,
    dataset_exists,
    fingerprint,
    finished_shard,
    forget_shard,
    get_fs,
    read_dataset,
    read_manifest,
    read_part_marker,
    write_one_part_dataset,
    write_part,
)

SCHEMA = pa.schema([pa.field("x", pa.int64()), pa.field("reject_reason", pa.string())])


def _table(xs, reasons):
    return pa.Table.from_pydict({"x": xs, "reject_reason": reasons}, schema=SCHEMA)


def _roundtrip(uri: str, storage: StorageConfig | None = None):
    t0, t1 = _table([1, 2], [None, "bad"]), _table([3], [None])
    p0 = write_part(uri, 0, t0, "fp1", compute_funnel(t0), storage)
    assert not dataset_exists(uri, storage)  # parts alone are not a dataset
    with pytest.raises(DatasetError, match="_manifest.json is missing"):
        read_dataset(uri, storage=storage)
    p1 = write_part(uri, 1, t1, "fp1", compute_funnel(t1), storage)
    commit_dataset(uri, [p1, p0], SCHEMA, "fp1", funnel=compute_funnel(pa.concat_tables([t0, t1])), storage=storage)
    assert dataset_exists(uri, storage)
    m = read_manifest(uri, storage)
    assert [p.name for p in m.parts] == ["part-00000.parquet", "part-00001.parquet"]
    assert m.num_rows == 3 and m.funnel == {"rows_in": 3, "kept": 2, "rejected": {"bad": 1}}
    assert read_dataset(uri, storage=storage).column("x").to_pylist() == [1, 2, 3]
    assert read_dataset(uri, kept_only=True, storage=storage).column("x").to_pylist() == [1, 3]
    # A shard marker only counts for its own fingerprint.
    assert read_part_marker(uri, 0, "fp1", storage).rows == 2
    assert read_part_marker(uri, 0, "other", storage) is None
    assert read_part_marker(uri, 7, "fp1", storage) is None
    # A forgotten shard is not finished any more (a resumed run redoes it); its part stays listed by the manifest.
    forget_shard(uri, 1, storage)
    forget_shard(uri, 7, storage)  # no marker: nothing to do
    assert finished_shard(uri, 1, "fp1", storage) is None and finished_shard(uri, 0, "fp1", storage) is not None
    assert read_dataset(uri, storage=storage).num_rows == 3


def test_local_roundtrip(tmp_path):
    _roundtrip(str(tmp_path / "ds"))


def test_s3_roundtrip(s3_endpoint, monkeypatch):
    storage = StorageConfig(endpoint_url=s3_endpoint)
    _roundtrip("s3://scoder/tests/ds", storage)
    import datasets

    # `datasets` refuses s3:// while offline (conftest sets HF_HUB_OFFLINE); nothing here goes to the hub.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    # The output is what `datasets` reads as Parquet, through s3fs.
    ds = datasets.load_dataset(
        "parquet",
        data_files="s3://scoder/tests/ds/part-*.parquet",
        storage_options={"endpoint_url": s3_endpoint},
        split="train",
    )
    assert sorted(ds["x"]) == [1, 2, 3]


def test_unlisted_parts_are_ignored(tmp_path):
    uri = str(tmp_path / "ds")
    t = _table([1], [None])
    p0 = write_part(uri, 0, t, "fp", storage=None)
    commit_dataset(uri, [p0], SCHEMA, "fp")
    write_part(uri, 1, _table([99], [None]), "fp")  # a crashed later writer's garbage
    assert read_dataset(uri).column("x").to_pylist() == [1]


def test_empty_dataset_reads_as_empty_table(tmp_path):
    uri = str(tmp_path / "empty")
    commit_dataset(uri, [], SCHEMA, "fp")
    t = read_dataset(uri)
    assert t.num_rows == 0 and t.schema == SCHEMA


def test_corrupt_and_missing_parts_are_clear_errors(tmp_path):
    uri = tmp_path / "ds"
    p0 = write_part(str(uri), 0, _table([1], [None]), "fp")
    commit_dataset(str(uri), [p0], SCHEMA, "fp")
    (uri / "part-00000.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="cannot read part part-00000.parquet"):
        read_dataset(str(uri))
    (uri / "part-00000.parquet").unlink()
    with pytest.raises(DatasetError, match="missing"):
        read_dataset(str(uri))
    (uri / "_manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="corrupt _manifest.json"):
        read_manifest(str(uri))


def test_fingerprint_is_stable_and_sensitive():
    from synth_core.config import RunConfig

    a = fingerprint("stage", RunConfig())
    assert a == fingerprint("stage", RunConfig()) and len(a) == 16
    changed = RunConfig()
    changed.dedup.threshold = 0.8
    assert fingerprint("stage", changed) != a


def _silent_endpoint():
    """A bare TCP socket that accepts connections (the kernel's backlog) and never answers a byte."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    return srv, f"http://127.0.0.1:{srv.getsockname()[1]}"


def _one_line_error(call) -> tuple[str, float]:
    import time

    t = time.monotonic()
    with pytest.raises(StorageError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg
    return msg, time.monotonic() - t


def test_silent_endpoint_fails_fast_in_one_line(monkeypatch):
    """An endpoint that accepts connections but never answers: bounded by read timeout x attempts, one line.

    Short timeouts keep the test fast; test_silent_endpoint_with_default_timeouts checks the defaults' bound."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    srv, endpoint = _silent_endpoint()
    with srv:
        storage = StorageConfig(endpoint_url=endpoint, connect_timeout_s=1, read_timeout_s=1, max_attempts=2)
        msg, took = _one_line_error(lambda: check_writable("s3://scoder/out", storage))
    assert endpoint in msg and "s3://scoder/out" in msg and "timeout" in msg.lower()
    assert took < 10, took  # 2 attempts x 1 s plus backoff; s3fs's own retries multiplied this before


@pytest.mark.slow
def test_silent_endpoint_with_default_timeouts(monkeypatch):
    """The shipped defaults (5 s connect, 15 s read, 2 attempts) fail a silent endpoint within 40 s (31 s seen).
    s3fs's own retry loop must stay off: with it on and botocore at 3 attempts, this call still hung after 300 s."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    srv, endpoint = _silent_endpoint()
    with srv:
        msg, took = _one_line_error(lambda: check_writable("s3://scoder/out", StorageConfig(endpoint_url=endpoint)))
    assert endpoint in msg and took < 40, (took, msg)


def test_missing_credentials_is_one_prompt_line(monkeypatch, tmp_path):
    import synth_core.storage.fs as storage_fs  # the module whose global get_fs reads

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe on a machine that has one
    monkeypatch.setattr(storage_fs, "_FOUND_AWS_CREDENTIALS", False)
    storage = StorageConfig(endpoint_url="http://127.0.0.1:9")
    msg, took = _one_line_error(lambda: check_writable("s3://scoder/out", storage))
    assert "no S3 credentials" in msg and "127.0.0.1:9" in msg and took < 5


def test_missing_bucket_is_one_line(s3_endpoint):
    msg, _ = _one_line_error(
        lambda: check_writable("s3://no-such-bucket/out", StorageConfig(endpoint_url=s3_endpoint))
    )
    assert "s3://no-such-bucket/out" in msg and s3_endpoint in msg


def test_check_writable_s3_ok_leaves_nothing(s3_endpoint):
    storage = StorageConfig(endpoint_url=s3_endpoint)
    check_writable("s3://scoder/probe-test", storage)
    fs, root = get_fs("s3://scoder/probe-test", storage)
    assert not fs.exists(root) or fs.ls(root) == []


def test_check_writable_local(tmp_path):
    import os

    check_writable(str(tmp_path / "new" / "deep"))  # created on the way
    assert (tmp_path / "new" / "deep").is_dir() and list((tmp_path / "new" / "deep").iterdir()) == []
    (tmp_path / "afile").write_text("x")
    msg, _ = _one_line_error(lambda: check_writable(str(tmp_path / "afile")))
    assert "existing file" in msg
    msg, _ = _one_line_error(lambda: check_writable(str(tmp_path / "afile" / "below")))
    assert "afile" in msg
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        # root writes through a 0500 mode; there, /sys (sysfs, which refuses new folders even to root) stands in
        # for a read-only mount
        target = ro / "out" if not (os.geteuid() == 0 and os.access(ro, os.W_OK)) else Path("/sys/scoder-out")
        msg, _ = _one_line_error(lambda: check_writable(str(target)))
        assert str(target) in msg and ("Permission denied" in msg or "not permitted" in msg or "Read-only" in msg)
    finally:
        ro.chmod(0o700)


HOLDER = """
import sys, time
from synth_core.config import StorageConfig
from synth_core.storage import WriterLock
lock = WriterLock(sys.argv[1], StorageConfig(lock_heartbeat_s=0.5), owner="holder-test")
lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def _start_holder(uri: str, hold_s: float):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri, str(hold_s)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_writer_lock_refuses_a_second_writer_naming_the_holder(tmp_path):
    """Two real processes: the second writer of a held location refuses in one line naming pid and owner;
    with lock_wait_s it waits for the holder to finish and then takes the lock."""
    uri = str(tmp_path / "out")
    holder = _start_holder(uri, 3)
    try:
        msg, took = _one_line_error(lambda: WriterLock(uri, StorageConfig()).acquire())
        assert f"pid {holder.pid}" in msg and "holder-test" in msg and "_writer.lock" in msg and took < 3
        with pytest.raises(WriterLockError):
            WriterLock(uri, StorageConfig()).acquire()
        with WriterLock(uri, StorageConfig(lock_wait_s=30)):  # waits until the holder releases (3 s)
            assert holder.poll() == 0 or holder.wait(5) == 0
            assert "held" not in (tmp_path / "out" / "_writer.lock").read_text()
        assert not (tmp_path / "out" / "_writer.lock").exists()  # released
    finally:
        holder.kill()
        holder.wait()


def test_writer_lock_of_a_dead_or_silent_run_is_taken_over(tmp_path):
    import json
    import signal

    uri = str(tmp_path / "out")
    holder = _start_holder(uri, 120)
    holder.send_signal(signal.SIGKILL)  # a kill -9'd run leaves its lock behind
    holder.wait()
    assert (tmp_path / "out" / "_writer.lock").exists()
    with WriterLock(uri, StorageConfig()) as lock:  # its pid is gone on this host: no wait for staleness
        assert json.loads((tmp_path / "out" / "_writer.lock").read_text())["token"] == lock.token
    # A run on another host whose heartbeat stopped longer than lock_stale_s ago.
    lock_file = tmp_path / "out" / "_writer.lock"
    old = {"owner": "x", "pid": 1, "host": "elsewhere", "started_at": 0, "heartbeat_at": 1.0, "token": "t"}
    lock_file.write_text(json.dumps(old))
    with WriterLock(uri, StorageConfig(lock_stale_s=60)):
        pass
    lock_file.write_text(json.dumps({**old, "heartbeat_at": __import__("time").time()}))
    with pytest.raises(WriterLockError, match="elsewhere"):
        WriterLock(uri, StorageConfig(lock_stale_s=60)).acquire()


def test_writer_lock_on_s3(s3_endpoint):
    storage = StorageConfig(endpoint_url=s3_endpoint)
    uri = "s3://scoder/tests/locked"
    with WriterLock(uri, storage, owner="first"):
        with pytest.raises(WriterLockError, match="first"):
            WriterLock(uri, storage).acquire()
    with WriterLock(uri, storage):
        pass


REWRITER = """
import sys, time
import pyarrow as pa
from synth_core.storage import write_part
table = pa.table({"x": list(range(200_000)), "reject_reason": [None] * 200_000})
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    write_part(sys.argv[1], 0, table, "fp")
"""


def test_rewriting_a_part_never_exposes_a_torn_file(tmp_path):
    """Two real processes rewrite the same part (two identical builds) while a reader keeps reading it: every
    read is a whole Parquet file. Before parts went through a temporary name, readers caught torn files."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = str(tmp_path / "ds")
    write_part(uri, 0, _table([1], [None]), "fp")
    writers = [subprocess.Popen([sys.executable, "-c", REWRITER, uri, "4"]) for _ in range(2)]
    reads = torn = 0
    try:
        while any(w.poll() is None for w in writers):
            try:
                # One open, then parse the bytes: pyarrow's path reader stats and opens separately, and a rename
                # between the two fails it with the name's new size (a race of the reader, not a torn file).
                data = (tmp_path / "ds" / "part-00000.parquet").read_bytes()
                n = pq.read_table(pa.BufferReader(data)).num_rows
                assert n in (1, 200_000)
            except Exception:
                torn += 1
            reads += 1
    finally:
        for w in writers:
            w.kill()
            w.wait()
    assert all(w.returncode == 0 for w in writers)
    assert reads > 10 and torn == 0, (reads, torn)
    assert [p.name for p in (tmp_path / "ds").iterdir() if ".tmp-" in p.name] == []


def test_calls_mid_run_on_a_silent_endpoint_are_one_line(monkeypatch):
    """After the preflight, an endpoint that stops answering fails a part write or a manifest read in one bounded
    StorageError line naming the endpoint, not a botocore traceback."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    srv, endpoint = _silent_endpoint()
    with srv:
        storage = StorageConfig(endpoint_url=endpoint, connect_timeout_s=1, read_timeout_s=1, max_attempts=1)
        for call in (
            lambda: write_part("s3://scoder/mid", 0, _table([1], [None]), "fp", storage=storage),
            lambda: read_manifest("s3://scoder/mid", storage),
        ):
            msg, took = _one_line_error(call)
            assert endpoint in msg and "s3://scoder/mid" in msg and took < 10, (msg, took)


def test_storage_errors_say_whether_a_retry_can_help(monkeypatch, tmp_path):
    """A time-out is worth a retry, a missing bucket or a file in the way is not; the flag survives pickling (a
    worker process's exception reaches the flow pickled)."""
    import pickle

    from synth_core.errors import is_permanent

    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError) as in_the_way:
        check_writable(str(tmp_path / "afile"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    srv, endpoint = _silent_endpoint()
    with srv, pytest.raises(StorageError) as timed_out:
        storage = StorageConfig(endpoint_url=endpoint, connect_timeout_s=1, read_timeout_s=1, max_attempts=1)
        check_writable("s3://scoder/out", storage)
    assert is_permanent(in_the_way.value) and not is_permanent(timed_out.value)
    for err in (in_the_way.value, timed_out.value, WriterLockError("held")):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err) and again.permanent == err.permanent


RACER = """
import sys, time
from synth_core.config import StorageConfig
from synth_core.storage import WriterLock, WriterLockError
lock = WriterLock(sys.argv[1], StorageConfig())
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # every racer tries at the same moment
try:
    lock.acquire()
except WriterLockError:
    print("lost", flush=True)
else:
    print("won", flush=True)
    time.sleep(2)
    lock.release()
"""


def test_writers_racing_for_a_free_location_one_wins(tmp_path):
    """Three real processes try a free location at the same instant (three identical builds started together):
    exactly one takes the lock (its write-settle-read protocol; seen on the loaded 2-core machine)."""
    import subprocess
    import sys
    import time

    for attempt in range(3):
        uri = str(tmp_path / f"out{attempt}")
        start = time.time() + 2.0  # after the interpreters started
        racers = [
            subprocess.Popen([sys.executable, "-c", RACER, uri, str(start)], stdout=subprocess.PIPE, text=True)
            for _ in range(3)
        ]
        outcomes = sorted(r.communicate(timeout=60)[0].strip() for r in racers)
        assert outcomes == ["lost", "lost", "won"], (attempt, outcomes)


def test_one_part_dataset_is_built_once_and_replaces_a_stale_one(tmp_path):
    uri = str(tmp_path / "one")
    builds = []

    def build():
        builds.append(1)
        t = _table([1, 2], [None, "bad"])
        return OnePart(t, funnel=compute_funnel(t), inputs=["in"], stats={"n": 2})

    assert write_one_part_dataset(uri, "fpA", build, stage="s") == uri
    m = read_manifest(uri)
    assert (m.fingerprint, m.stage, m.inputs, m.stats, m.kept_rows) == ("fpA", "s", ["in"], {"n": 2}, 1)
    assert m.parts[0].funnel == m.funnel and read_dataset(uri).num_rows == 2
    write_one_part_dataset(uri, "fpA", build, stage="s")
    assert len(builds) == 1  # done: free

    def empty():
        return OnePart(_table([], []), funnel={"rows_in": 0, "kept": 0, "rejected": {}}, part_if_empty=False)

    write_one_part_dataset(uri, "fpB", empty, stage="s")  # another fingerprint at the same location
    m = read_manifest(uri)
    assert (m.fingerprint, m.parts, m.num_rows) == ("fpB", [], 0)
    assert read_dataset(uri).schema == SCHEMA

    def raw():
        return OnePart(_table([3], [None]), funnel={"rows_in": 5, "kept": 1, "rejected": {}}, funnel_in_part=False)

    write_one_part_dataset(uri, "fpC", raw, stage="s")
    m = read_manifest(uri)
    assert m.parts[0].funnel == {} and m.funnel["rows_in"] == 5
