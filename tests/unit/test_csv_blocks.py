"""A CSV history read in blocks (as the jobs' Ray tasks read it, here one block
after the other, without Ray) gives what one reader of the whole file gives:
the same valid rows, the same rejects, malformed lines at their exact line
numbers wherever the blocks are cut, and no row that spans two lines."""

from __future__ import annotations

import io
import json
import random

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pytest

from configs.errors import InvalidInputError
from features.schema import validate_frame
from jobs import _common

HEADER = "transaction_id,user_id,amount,merchant,country,timestamp,is_fraud,note"
N_COLUMNS = len(HEADER.split(","))


def row(i: int, amount: str = "12.50", note: str = "") -> str:
    return f"t-{i},u{i % 7},{amount},m{i % 5},FR,2025-01-{1 + i % 28:02d}T10:00:00Z,{i % 2},{note}"


def read_in_blocks(path, block_bytes: int) -> tuple[list[pa.Table], pd.DataFrame, int]:
    """What `HistoryRead` does through Ray, one block after the other here."""
    blocks = _common.plan_blocks(path, block_bytes)
    results = [_common.read_block(b) for b in blocks]
    infos = [info for _, _, info in results]
    for i, types in _common.retypes(infos).items():
        results[i] = _common.read_block(blocks[i], types)
        infos[i] = results[i][2]
    rejects = _common._rejects_frame(blocks, [r for _, r, _ in results], infos)
    return [v for v, _, _ in results], rejects, len(blocks)


def read_whole(path) -> tuple[pa.Table, pd.DataFrame]:
    """The single-threaded reader of the whole file that the jobs used before blocks:
    its row numbers are line numbers when no line is empty and no row spans lines."""
    bad = []

    def keep(r):
        bad.append((r.number, r.actual_columns, r.expected_columns, r.text))
        return "skip"

    table = pa_csv.read_csv(
        path, read_options=pa_csv.ReadOptions(use_threads=False),
        parse_options=pa_csv.ParseOptions(invalid_row_handler=keep),
        convert_options=pa_csv.ConvertOptions(column_types={c: pa.string() for c in _common.TEXT_COLUMNS},
                                              strings_can_be_null=False))
    valid, rejects = validate_frame(table.to_pandas())
    malformed = pd.DataFrame({"line": [t for *_, t in bad], "reason": [
        f"csv: line {n} of {path.name} has {a} fields, expected {e}" for n, a, e, _ in bad]})
    originals = rejects.drop(columns=["reason"]).to_dict(orient="records")
    validated = pd.DataFrame([json.loads(json.dumps(r, default=str)) for r in originals])
    validated["reason"] = rejects["reason"].to_numpy()
    return pa.Table.from_pandas(valid, preserve_index=False), pd.concat([malformed, validated], ignore_index=True)


def canonical(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.astype(str)
    return frame[sorted(frame.columns)].sort_values(sorted(frame.columns)).reset_index(drop=True)


@pytest.fixture
def history_with_bad_lines(tmp_path):
    """200 rows; malformed lines (too few, too many fields) and bad values spread over the file."""
    lines = [HEADER] + [row(i) for i in range(200)]
    lines[3] = row(3, amount="-3")
    lines[50] = "u-short,1.00,m1"
    lines[51] = row(51, amount="abc")
    lines[120] = row(120) + ",extra,fields"
    lines.append("last,line,without,a,newline")
    path = tmp_path / "history.csv"
    path.write_text("\n".join(lines))  # no newline after the last line
    return path, lines


@pytest.mark.parametrize("block_bytes", [1 << 20, 700, 64, 1])
def test_blocks_give_what_the_whole_file_reader_gives(history_with_bad_lines, block_bytes):
    path, _ = history_with_bad_lines
    valid, rejects, n_blocks = read_in_blocks(path, block_bytes)
    if block_bytes <= 700:
        assert n_blocks > 5
    whole_valid, whole_rejects = read_whole(path)
    got = pa.concat_tables(valid).to_pandas()
    pd.testing.assert_frame_equal(got.reset_index(drop=True), whole_valid.to_pandas())
    pd.testing.assert_frame_equal(canonical(rejects), canonical(whole_rejects))


@pytest.mark.parametrize("block_bytes", [1 << 20, 300, 1])
def test_malformed_lines_keep_their_line_numbers_in_every_block(tmp_path, block_bytes):
    """Line numbers as an editor shows them: empty lines and CRLF line ends counted,
    the first line of a block and a last line without a line end included."""
    lines = [HEADER, row(0), "", "first,of,a,block", row(1), "", "", "two,fields"]
    lines += [row(i) for i in range(2, 30)] + ["x", "", row(31), "the,last,line"]
    path = tmp_path / "h.csv"
    path.write_bytes("\r\n".join(lines).encode())
    _, rejects, n_blocks = read_in_blocks(path, block_bytes)
    expected = {i + 1: text for i, text in enumerate(lines) if text and len(text.split(",")) != N_COLUMNS}
    assert len(expected) == 4
    got = {int(r.split()[2]): text for r, text in zip(rejects["reason"], rejects["line"], strict=True)}
    assert got == expected
    for reason, text in zip(rejects["reason"], rejects["line"], strict=True):
        assert reason.endswith(f" of h.csv has {len(text.split(','))} fields, expected {N_COLUMNS}")
    if block_bytes == 1:
        assert n_blocks == len(lines)  # a block per line, an empty one too


@pytest.mark.parametrize("block_bytes", [1 << 20, 1])
def test_a_row_spanning_lines_is_refused_naming_its_line(tmp_path, block_bytes):
    """A quoted field with a line end in it: the line that opens it is a reject, and
    the next line is read as a row of its own, wherever the blocks are cut."""
    lines = [HEADER, row(0), row(1, note='"a note'), 'that goes on",', row(2), row(3, note='"closed, ok ""x"""')]
    path = tmp_path / "h.csv"
    path.write_text("\n".join(lines) + "\n")
    valid, rejects, _ = read_in_blocks(path, block_bytes)
    ids = pa.concat_tables(valid).column("transaction_id").to_pylist()
    assert ids == ["t-0", "t-2", "t-3"]
    assert pa.concat_tables(valid).column("note").to_pylist()[-1] == 'closed, ok "x"'
    by_line = dict(zip(rejects["reason"], rejects["line"], strict=True))
    assert by_line == {
        "csv: line 3 of h.csv opens a quoted field that does not close on that line "
        "(each row of a CSV history must be one line)": lines[2],
        f"csv: line 4 of h.csv has 2 fields, expected {N_COLUMNS}": lines[3],
    }


def test_every_input_row_is_kept_or_rejected(history_with_bad_lines):
    path, lines = history_with_bad_lines
    valid, rejects, _ = read_in_blocks(path, 97)
    assert sum(t.num_rows for t in valid) + len(rejects) == len(lines) - 1


def test_a_header_that_opens_a_quote_is_refused(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text('user_id,"amount\n' + "u,1\n")
    with pytest.raises(InvalidInputError, match="header line of .*h.csv opens a quoted field"):
        read_in_blocks(path, 1 << 20)


def test_a_column_typed_differently_in_two_blocks_is_typed_as_for_the_whole_file(tmp_path):
    """Empty in the first block, text later; integers first, decimals later."""
    lines = [HEADER + ",score"] + [row(i) + ",7" for i in range(40)]
    lines += [row(i, note="a note") + ",7.5" for i in range(40, 80)]
    path = tmp_path / "h.csv"
    path.write_text("\n".join(lines) + "\n")
    valid, _, n_blocks = read_in_blocks(path, 400)
    assert n_blocks > 4
    whole, _ = read_whole(path)
    assert {t.schema for t in valid} == {whole.schema}
    assert pa.types.is_large_string(whole.schema.field("note").type)  # Arrow text, through pandas
    assert whole.schema.field("score").type == pa.float64()
    pd.testing.assert_frame_equal(pa.concat_tables(valid).to_pandas(), whole.to_pandas())


def test_cuts_fall_after_line_ends(tmp_path):
    data = b"".join(b"%d,%s\n" % (i, b"x" * random.Random(i).randint(0, 40)) for i in range(500))
    path = tmp_path / "h.csv"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        cuts = _common._line_cuts(_Seekable(fh), len(data), 1000)
    assert cuts[0] == 0 and cuts[-1] == len(data) and cuts == sorted(set(cuts))
    assert all(data[c - 1:c] == b"\n" for c in cuts[1:-1])
    assert len(cuts) > 10


class _Seekable:
    def __init__(self, fh):
        self.fh = fh

    def seek(self, offset):
        self.fh.seek(offset)

    def read(self, n):
        return self.fh.read(n)


def test_lines_end_as_arrow_ends_them():
    """\\n, \\r\\n and a lone \\r each end a line (as for bytes.splitlines)."""
    rng = random.Random(3)
    for _ in range(2000):
        data = bytes(rng.choice(b'a,"\n\r') for _ in range(rng.randint(0, 12)))
        starts, stops = _common._line_bounds(data)
        assert [data[a:b] for a, b in zip(starts, stops, strict=True)] == data.splitlines(), data
        assert _common._count_lines(data) == len(data.splitlines()), data


def test_an_open_quote_is_found_as_arrow_finds_it():
    """A line "opens a quote" exactly when Arrow's reader would go on reading the next
    line into the same row."""
    rng = random.Random(5)
    for _ in range(3000):
        line = bytes(rng.choice(b'ab,"  ') for _ in range(rng.randint(1, 10)))
        invalid: list[int] = []
        rows = pa_csv.read_csv(
            io.BytesIO(line + b"\nZ\n"),
            read_options=pa_csv.ReadOptions(use_threads=False, column_names=["c"]),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=lambda r, seen=invalid: seen.append(1) or "skip"),
        ).num_rows
        joined = rows + len(invalid) == 1
        assert _common._opens_quote(line) == joined, line


def test_a_parquet_file_is_validated_in_slices_as_a_whole(tmp_path, monkeypatch):
    from jobs.simulate import simulate

    df = simulate(users=30, days=5, seed=3).astype({"amount": str})
    df.iloc[[5, 300], df.columns.get_loc("amount")] = ["abc", "-1"]
    path = tmp_path / "h.parquet"
    df.to_parquet(path, index=False)
    monkeypatch.setattr(_common, "PARQUET_SLICE_ROWS", 97)
    sizes: list[int] = []

    def validate_and_count(frame):
        sizes.append(len(frame))
        return validate_frame(frame)

    monkeypatch.setattr("features.schema.validate_frame", validate_and_count)
    valid, rejects, n_blocks = read_in_blocks(path, 1 << 20)
    assert max(sizes) == 97 and sum(sizes) == len(df)  # pandas holds a slice at a time
    whole_valid, whole_rejects = validate_frame(df)
    assert n_blocks == 1
    pd.testing.assert_frame_equal(pa.concat_tables(valid).to_pandas(),
                                  pa.Table.from_pandas(whole_valid, preserve_index=False).to_pandas())
    assert sorted(rejects["reason"]) == sorted(whole_rejects["reason"]) and len(rejects) == 2
