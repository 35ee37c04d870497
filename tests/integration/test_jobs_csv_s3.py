"""A CSV history on s3:// read in blocks by Ray tasks (moto's S3 server on
127.0.0.1): the driver reads only the header and the bytes around each cut, the
tasks read their byte ranges with their own node's credentials, and the result
is the same as from the same file on local disk, line numbers included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from jobs.simulate import simulate
from tests.s3_server import aws_env, create_bucket, start_moto, stop

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BUCKET = "csv-blocks"
SECRET = f"s3cr3t-{uuid.uuid4().hex}"
BLOCK_BYTES = 4096

# Run in a process of its own, with the S3 variables in its environment only, and a
# Ray of its own whose workers inherit them (as a node's environment gives them).
READ_SCRIPT = """
import json, sys
import ray
from jobs import _common
ray.init(num_cpus=2, include_dashboard=False)
reading = _common.HistoryRead(sys.argv[1], block_bytes=int(sys.argv[2]))
history = reading.result()
rows = sum(t.num_rows for t in ray.get(history.valid))
print(json.dumps({"blocks": len(reading.blocks), "rows": rows,
                  "rejects": history.rejects.fillna("").astype(str).to_dict(orient="records")}))
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    proc, endpoint = start_moto()
    try:
        create_bucket(endpoint, SECRET, BUCKET)
        yield endpoint
    finally:
        stop(proc)


def _history_csv(path: Path) -> None:
    """A simulated history with malformed lines spread over its blocks: too few fields,
    a quoted field that does not close, and a last line without a newline."""
    df = simulate(users=40, days=6, seed=12)
    df.to_csv(path, index=False)
    lines = path.read_text().splitlines()
    lines.insert(len(lines) // 3, "u-short,1.00,m1")
    lines.insert(2 * len(lines) // 3, lines[5][:20] + ',"an open quote')
    lines.append("last,line,without,newline")
    path.write_text("\n".join(lines))


def _read(uri: str, env: dict[str, str]) -> dict:
    ray_tmp = Path(f"/tmp/rt-{uuid.uuid4().hex[:6]}")  # Ray's socket paths must stay short
    try:
        result = subprocess.run([sys.executable, "-c", READ_SCRIPT, uri, str(BLOCK_BYTES)], cwd=REPO,
                                env=dict(env, RAY_TMPDIR=str(ray_tmp), RAY_ADDRESS="local"),
                                capture_output=True, text=True, timeout=600, check=False)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_csv_on_s3_reads_in_blocks_as_the_same_file_on_disk(s3, tmp_path):
    from pyarrow.fs import S3FileSystem

    local = tmp_path / "history.csv"
    _history_csv(local)
    env = aws_env(s3, SECRET)
    fs = S3FileSystem(endpoint_override=s3, region=env["AWS_REGION"], access_key=env["AWS_ACCESS_KEY_ID"],
                      secret_key=env["AWS_SECRET_ACCESS_KEY"])
    with fs.open_output_stream(f"{BUCKET}/in/history.csv") as out:
        out.write(local.read_bytes())
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    on_s3 = _read(f"s3://{BUCKET}/in/history.csv", dict(base, **env))
    on_disk = _read(str(local), base)

    assert on_s3["blocks"] == on_disk["blocks"] > 5
    assert on_s3["rows"] == on_disk["rows"] and on_s3["rejects"] == on_disk["rejects"]
    lines = local.read_text().splitlines()
    assert on_s3["rows"] + len(on_s3["rejects"]) == len(lines) - 1
    reasons = {r["reason"] for r in on_s3["rejects"]}
    expected = {f"csv: line {i + 1} of history.csv" for i, line in enumerate(lines)
                if line.startswith(("u-short", "last,line")) or line.endswith(',"an open quote')}
    assert len(expected) == 3
    assert {r.split(" has ")[0].split(" opens ")[0] for r in reasons} == expected
