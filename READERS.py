"""How each file format is read as rows: a dict per row, and where it is ("file:line", or "file: row N"), so
that every error names it. SOURCES.py decides what is read; these functions read it, streaming.

    a.txt                      a non-empty line is a row {"text": line}
    a.jsonl                    a line is a JSON object
    a.json                     an array of JSON objects (read whole)
    a.csv  a.tsv               a header, then a row per record (, ; tab or | - the one the header is split by)
    a.parquet                  one row group at a time, only the columns read (pyarrow)
    any of the first five + .gz or .zst   (gzip; zstandard)
    a datasets.Dataset         Arrow batches (a save_to_disk folder, a dataset repository, streamed or not)

Each reader takes `select(columns, where)`, which checks a file's columns and says which to read under which
key, and `rename(row)`, which does the same for a JSON object, whose fields may differ from row to row.
"""
import codecs
import contextlib
import csv
import gzip
import io
import itertools
import json

from REPORT import UserError, first_line, need

BATCH = 4096  # rows read at a time from columnar data


class Where:
    """Where a row is: "file:line", or "file: row N" (with its line in a CSV). Written out only when an error
    names it: formatting every row's would cost a tenth of the time of reading a Parquet file."""
    __slots__ = ("path", "row", "line")

    def __init__(self, path, row=None, line=None):
        self.path, self.row, self.line = path, row, line

    def __str__(self):
        if self.row is None:
            return f"{self.path}:{self.line}"
        return f"{self.path}: row {self.row:,}" + (f" (line {self.line})" if self.line else "")


@contextlib.contextmanager
def opened(path):
    """A data file as bytes, decompressed (.gz, .zst)."""
    damaged = ()
    if path.endswith(".gz"):
        fh, damaged = gzip.open(path, "rb"), (OSError, EOFError)  # truncated, or not gzip at all
    elif path.endswith(".zst"):
        zstandard = need("zstandard", f"{path}: a .zst file", "zstandard")
        damaged = (OSError, EOFError, zstandard.ZstdError)
        fh = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True,
                                                                           closefd=True))
    else:
        fh = open(path, "rb")
    try:
        yield fh
    except damaged as e:
        raise UserError(f"{path}: cannot be decompressed ({first_line(e, 120)}) - the file is damaged or truncated")
    finally:
        fh.close()


def lines(path):
    """(line number, text) of a text file, UTF-8 (a leading BOM dropped), errors naming the line."""
    with opened(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield lineno, raw.decode("utf-8").removeprefix("\ufeff") if lineno == 1 else raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid UTF-8 (byte {e.start + 1} of the line) - re-save the "
                                "file as UTF-8")


def text_rows(path, select, rename):
    for lineno, line in lines(path):
        if line.strip():
            yield {"text": line.rstrip("\r\n")}, Where(path, line=lineno)


def jsonl_rows(path, select, rename):
    first = True
    for lineno, line in lines(path):
        if not line.strip():
            continue
        where = Where(path, line=lineno)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON ({e.msg}, column {e.colno}) - each line must be one JSON object "
                            "like {\"text\": \"…\"}")
        if first and isinstance(row, dict):
            select(list(row), where)
        first = False
        yield rename(row), where


def json_rows(path, select, rename):
    """A .json file: one array of objects, read whole (a large set is better as .jsonl or Parquet)."""
    with opened(path) as fh:
        raw = fh.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: invalid UTF-8 (byte {e.start + 1}) - re-save the file as UTF-8")
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}) - the file must be one array "
                        "of objects")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected an array of objects [{{…}}, …], got a {type(data).__name__} - for one "
                        "object per line name the file .jsonl")
    for n, row in enumerate(data, 1):
        if n == 1 and isinstance(row, dict):
            select(list(row), Where(path, 1))
        yield rename(row), Where(path, n)


def csv_rows(path, select, rename):
    """A header, then one row per record; quoted fields may hold newlines and separators. The separator of a
    .csv is the one of , ; tab | that the header holds most of."""
    csv.field_size_limit(1 << 30)  # a document in a cell may be longer than csv's 128 KiB default
    with opened(path) as raw:
        fh, reader = codecs.getreader("utf-8-sig")(raw), csv.reader([])
        try:
            header = fh.readline()
            sep = "\t" if ".tsv" in path[-8:] else max(",;\t|", key=header.count)  # .tsv, .tsv.gz, .tsv.zst
            reader = csv.reader(itertools.chain([header], fh), delimiter=sep)
            columns = next(reader, [])
            read = select(columns, f"{path}: the header")
            at, keys = [columns.index(c) for c, _ in read], [k for _, k in read]
            n, line = 0, reader.line_num
            for record in reader:
                start, line = line + 1, reader.line_num
                if not record:
                    continue
                n += 1
                if len(record) != len(columns):
                    raise UserError(f"{Where(path, n, start)}: {len(record)} fields, the header has {len(columns)} - "
                                    f"quote fields that hold {sep!r} or a line break")
                yield dict(zip(keys, [record[i] for i in at])), Where(path, n, start)
        except UnicodeDecodeError:
            raise UserError(f"{path}: invalid UTF-8 after line {reader.line_num} - re-save the file as UTF-8")
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: {e} - check the quoting near that line")


def parquet_rows(path, select, rename):
    """A Parquet file, one row group at a time and only the columns read, so memory stays flat."""
    pq = need("pyarrow.parquet", f"{path}: a Parquet file", "pyarrow")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid/OSError for a file that is not Parquet or cut short
        raise UserError(f"{path}: not a readable Parquet file ({first_line(e, 120)}) - the file is damaged or "
                        "truncated; download or write it again")
    read = select(pf.schema_arrow.names, path)
    n = 0
    for group in range(pf.num_row_groups):
        try:
            for batch in pf.iter_batches(batch_size=BATCH, row_groups=[group], columns=[c for c, _ in read]):
                for row in as_dicts(batch, [k for _, k in read]):
                    n += 1
                    yield row, Where(path, n)
        except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise UserError(f"{path}: row group {group + 1} of {pf.num_row_groups} cannot be read "
                            f"({first_line(e, 120)}) - the file is damaged or truncated; download or write it again")


def arrow_rows(ds, select, where):
    """The rows of a datasets.Dataset or IterableDataset, in order, a batch of BATCH rows at a time."""
    columns = ds.column_names or next(iter(ds)).keys()  # a streamed dataset may know its columns only by a row
    read = select(list(columns), where)
    ds = ds.select_columns([c for c, _ in read])
    n = 0
    for table in ds.with_format("arrow").iter(batch_size=BATCH):
        for row in as_dicts(table, [k for _, k in read]):
            n += 1
            yield row, Where(where, n)


def as_dicts(table, keys):
    """An Arrow table or record batch as a dict per row, its columns under `keys` (column by column: three times
    faster than to_pylist)."""
    return [dict(zip(keys, values)) for values in zip(*(column.to_pylist() for column in table.columns))]
