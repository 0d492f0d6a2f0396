"""nemo_surgery.corpus on real files: the paper's prompt list, the other formats, every error, and
property tests that no input bytes raise anything but NemoError."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemo_surgery.corpus import Corpus, Prompt, read_corpus
from nemo_surgery.errors import NemoError

DATA = Path(__file__).parent / "data"
PAPER = DATA / "memorized_laion_prompts.csv"
PAPER_HEADER = ";Caption;URL;type;mean_sscd;max_sscd;Index\n"


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def expect_error(path: Path, *, line: int | None = None, contains: tuple[str, ...] = (), **kwargs) -> str:
    """Read `path`, expect a NemoError, check the message is one line naming the file (and line)."""
    with pytest.raises(NemoError) as info:
        read_corpus(path, **kwargs)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert str(path) in message
    if line is not None:
        assert f"line {line}:" in message, message
    for part in contains:
        assert part in message, message
    return message


# --- the paper's file -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper() -> Corpus:
    return read_corpus(PAPER)


def test_paper_file_counts(paper: Corpus) -> None:
    assert paper.format == "nemo-csv"
    assert len(paper.prompts) == 500
    assert paper.memorized_types == {"VM": 112, "TM": 388}
    assert paper.duplicates == ()
    assert len({p.id for p in paper.prompts}) == 500
    assert paper.sha256 == hashlib.sha256(PAPER.read_bytes()).hexdigest()
    assert paper.path == PAPER.resolve()
    assert all(p.image is None for p in paper.prompts)


def test_paper_file_rows(paper: Corpus) -> None:
    first = paper.prompts[0]
    assert first == Prompt(id="1030727993", text="The No Limits Business Woman Podcast", type="VM", image=None, line=2)
    # Upstream LAION captions carry CSV-escaped quotes; the file quotes them once more.
    quoted = paper.prompts[3]
    assert quoted.line == 5
    assert quoted.text == '"Watch: Passion Pit\'s New Video, ""Lifted Up (1985)"""'
    # Row 81 has `;` inside its quoted URL: the row must not split there.
    row81 = paper.prompts[81]
    assert row81.text == "Design Art Light in Dense Fall Forest with Fog Ultra Vibrant Landscape Oversized Circle Wall Art"
    assert row81.type == "TM" and row81.line == 83
    assert any(p.text == "The Health Mastery Café with Dr. Dave" for p in paper.prompts)
    assert paper.prompts[-1].line == 501


def test_nemo_csv_caption_with_semicolon_and_quotes(tmp_path: Path) -> None:
    path = write(
        tmp_path / "mem.csv",
        PAPER_HEADER + '0;"Poster; ""Blue"" edition";"http://x/a;b";vm;0.9;0.91;42\n1;plain;http://y;Tm;;;43\n',
    )
    corpus = read_corpus(path)
    assert corpus.format == "nemo-csv"
    assert corpus.prompts == (
        Prompt(id="42", text='Poster; "Blue" edition', type="VM", image=None, line=2),
        Prompt(id="43", text="plain", type="TM", image=None, line=3),
    )
    assert corpus.memorized_types == {"VM": 1, "TM": 1}


def test_reading_leaves_the_file_unchanged(tmp_path: Path) -> None:
    copy = tmp_path / "mem.csv"
    shutil.copyfile(PAPER, copy)
    before = (copy.read_bytes(), os.stat(copy).st_mtime_ns)
    read_corpus(copy)
    bad = write(tmp_path / "bad.csv", PAPER_HEADER + "0;;u;VM;;;1\n")
    bad_before = bad.read_bytes()
    expect_error(bad, line=2)
    assert (copy.read_bytes(), os.stat(copy).st_mtime_ns) == before
    assert bad.read_bytes() == bad_before


# --- other formats ------------------------------------------------------------------------------


def test_csv_with_prompt_column(tmp_path: Path) -> None:
    corpus = read_corpus(write(tmp_path / "ref.csv", "prompt,style\na red barn,photo\n  a cat  ,oil\n"))
    assert corpus.format == "csv"
    assert [(p.id, p.text, p.type, p.line) for p in corpus.prompts] == [
        ("1", "a red barn", None, 2),
        ("2", "a cat", None, 3),
    ]
    assert corpus.memorized_types == {}


def test_tsv_with_caption_column(tmp_path: Path) -> None:
    corpus = read_corpus(write(tmp_path / "p.tsv", "id\tCaption\nx1\ta, b; c\nx2\tsecond\n"))
    assert corpus.format == "tsv"
    assert [(p.id, p.text) for p in corpus.prompts] == [("x1", "a, b; c"), ("x2", "second")]


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_delimiter_is_found_whatever_the_suffix(tmp_path: Path, delimiter: str) -> None:
    path = write(tmp_path / "p.csv", f"n{delimiter}PROMPT{delimiter}extra\n1{delimiter}hello{delimiter}z\n")
    assert [p.text for p in read_corpus(path).prompts] == ["hello"]


def test_one_column_csv(tmp_path: Path) -> None:
    corpus = read_corpus(write(tmp_path / "p.csv", 'prompt\n"a, b"\nc; d\n\n'))
    assert [p.text for p in corpus.prompts] == ["a, b", "c; d"]


def test_doubled_quotes(tmp_path: Path) -> None:
    corpus = read_corpus(write(tmp_path / "p.csv", 'prompt,k\n"He said ""hi"", then left",1\n"""",2\n'))
    assert [p.text for p in corpus.prompts] == ['He said "hi", then left', '"']


def test_quoted_newline_keeps_line_numbers(tmp_path: Path) -> None:
    corpus = read_corpus(write(tmp_path / "p.csv", 'prompt,k\n"two\nlines",1\nnext,2\n'))
    assert [(p.text, p.line) for p in corpus.prompts] == [("two\nlines", 2), ("next", 4)]


def test_txt(tmp_path: Path) -> None:
    corpus = read_corpus(write(tmp_path / "p.txt", "first prompt\n\n   \nsecond, with comma\r\nthird"))
    assert corpus.format == "txt"
    assert [(p.id, p.text, p.line, p.type) for p in corpus.prompts] == [
        ("1", "first prompt", 1, None),
        ("2", "second, with comma", 4, None),
        ("3", "third", 5, None),
    ]


def test_jsonl(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    write(tmp_path / "img" / "a.png", b"png")
    lines = [
        {"prompt": "a dog", "type": "vm", "id": 7, "image": "img/a.png"},
        {"Caption": "a bird"},
        {"prompt": "a fish", "type": None, "id": "f"},
    ]
    text = "\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n"
    corpus = read_corpus(write(tmp_path / "p.jsonl", text))
    assert corpus.format == "jsonl"
    assert corpus.prompts == (
        Prompt(id="7", text="a dog", type="VM", image=(tmp_path / "img" / "a.png").resolve(), line=1),
        Prompt(id="2", text="a bird", type=None, image=None, line=2),
        Prompt(id="f", text="a fish", type=None, image=None, line=4),
    )


@pytest.mark.parametrize(
    ("name", "content"),
    [("p.csv", "prompt,x\ncafé,1\n"), ("p.txt", "café\n"), ("p.jsonl", '{"prompt": "café"}\n')],
)
def test_bom_is_skipped(tmp_path: Path, name: str, content: str) -> None:
    corpus = read_corpus(write(tmp_path / name, b"\xef\xbb\xbf" + content.encode("utf-8")))
    assert [p.text for p in corpus.prompts] == ["café"]


def test_duplicates_are_reported(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", "prompt\na cat\na dog\n  a cat\nA cat\na dog\n")
    corpus = read_corpus(path)
    assert [(p.id, p.text) for p in corpus.prompts] == [("1", "a cat"), ("2", "a dog"), ("4", "A cat")]
    assert corpus.duplicates == ((4, 2, "a cat"), (6, 3, "a dog"))


def test_training_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    write(tmp_path / "images" / "0.png", b"x")
    path = write(
        tmp_path / "mem.csv",
        ";Caption;URL;type;Index;image\n0;one;u;VM;0;images/0.png\n1;two;u;TM;1;\n",
    )
    corpus = read_corpus(path)
    assert [p.image for p in corpus.prompts] == [(tmp_path / "images" / "0.png").resolve(), None]


def test_windows_separators_in_image_paths(tmp_path: Path) -> None:
    """A corpus written on Windows names `images\\0.png`: read as `images/0.png`, unless a file of
    that very name (a backslash is legal in a POSIX name) exists; `..\\` still counts as leaving the
    folder."""
    (tmp_path / "images").mkdir()
    write(tmp_path / "images" / "0.png", b"x")
    write(tmp_path / "a\\b.png", b"y")
    write(tmp_path / "outside.png", b"z")
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "mem.csv", "prompt,image\none,images\\0.png\ntwo,a\\b.png\n")
    assert [p.image for p in read_corpus(path).prompts] == [(tmp_path / "images" / "0.png").resolve(),
                                                             (tmp_path / "a\\b.png").resolve()]
    up = write(tmp_path / "sub" / "mem.csv", "prompt,image\none,..\\outside.png\n")
    with pytest.raises(NemoError, match="resolves outside the corpus folder"):
        read_corpus(up)


def test_outside_image_allowed_when_asked(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside.png", b"x")
    (tmp_path / "corpus").mkdir()
    path = write(tmp_path / "corpus" / "p.csv", "prompt,image\nx,../outside.png\n")
    expect_error(path, line=2, contains=("outside",))
    assert read_corpus(path, allow_outside_images=True).prompts[0].image == outside.resolve()


# --- errors -------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.csv", contains=("not found",))


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "d.csv").mkdir()
    expect_error(tmp_path / "d.csv", contains=("directory",))


def test_unsupported_suffix(tmp_path: Path) -> None:
    expect_error(write(tmp_path / "p.xlsx", "prompt\nx\n"), contains=("unsupported",))


@pytest.mark.parametrize("name", ["e.csv", "e.tsv", "e.txt", "e.jsonl"])
@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\n \n\t\n"])
def test_empty_file(tmp_path: Path, name: str, content: bytes) -> None:
    expect_error(write(tmp_path / name, content), contains=("empty",))


def test_header_only(tmp_path: Path) -> None:
    expect_error(write(tmp_path / "h.csv", PAPER_HEADER + "\n"), contains=("header only",))


def test_no_caption_column_lists_columns(tmp_path: Path) -> None:
    message = expect_error(write(tmp_path / "p.csv", "title,label\na,b\n"), line=1, contains=("no caption column",))
    assert "'title'" in message and "'label'" in message


def test_wrong_delimiter_is_named(tmp_path: Path) -> None:
    message = expect_error(write(tmp_path / "p.tsv", "title;url;kind\na;b;c\n"), contains=("no caption column",))
    assert "';'" in message and "'title'" in message


def test_empty_caption(tmp_path: Path) -> None:
    expect_error(write(tmp_path / "p.csv", PAPER_HEADER + "0;ok;u;VM;;;1\n1;  ;u;VM;;;2\n"), line=3, contains=("empty caption",))


def test_wrong_field_count(tmp_path: Path) -> None:
    expect_error(write(tmp_path / "p.csv", "prompt,k\na,1\nb, c,2\n"), line=3, contains=("fields",))


def test_unclosed_quote(tmp_path: Path) -> None:
    expect_error(write(tmp_path / "p.csv", 'prompt,k\na,1\n"b,2\nc,3\n'), line=3, contains=("never closed",))


def test_duplicate_ids(tmp_path: Path) -> None:
    expect_error(write(tmp_path / "p.csv", "id,prompt\n1,a\n1,b\n"), line=3, contains=("already used on line 2",))


def test_both_prompt_and_caption(tmp_path: Path) -> None:
    expect_error(write(tmp_path / "p.csv", "prompt,caption\na,b\n"), line=1,
                 contains=("more than one caption column (caption, prompt)",))
    expect_error(write(tmp_path / "p.jsonl", '{"text": "a", "prompt": "b"}\n'), line=1,
                 contains=("more than one caption field (prompt, text)",))


def test_image_folder_metadata(tmp_path: Path) -> None:
    """The metadata file of a Hugging Face image folder (what diffusers' text-to-image training
    reads): `file_name` and `text`, as CSV or JSONL, images beside it."""
    (tmp_path / "a.png").write_bytes(b"x")
    for name, content in [("metadata.csv", "file_name,text\na.png,a red barn\n"),
                          ("metadata.jsonl", '{"file_name": "a.png", "text": "a red barn"}\n')]:
        (p,) = read_corpus(write(tmp_path / name, content)).prompts
        assert p.text == "a red barn" and p.image == (tmp_path / "a.png").resolve()


@pytest.mark.parametrize("column", ["training_image", "Train_Image", "img_path", "filename"])
def test_training_image_column_names(tmp_path: Path, column: str) -> None:
    """The paper's file with a training-image column under one of the names such files use."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    body = f';Caption;URL;type;mean_sscd;max_sscd;Index;{column}\n0;"a red; barn";http://x;VM;0.9;0.9;7;imgs/a.png\n'
    (p,) = read_corpus(write(tmp_path / "mem.csv", body)).prompts
    assert p.text == "a red; barn" and p.type == "VM" and p.image == (tmp_path / "imgs" / "a.png").resolve()


@pytest.mark.parametrize("name", ["p.csv", "p.txt", "p.jsonl"])
def test_line_too_long(tmp_path: Path, name: str) -> None:
    secret = "Z" * 5000
    body = {"p.csv": f"prompt\nok\n{secret}\n", "p.txt": f"ok\n{secret}\n", "p.jsonl": f'{{"prompt": "{secret}"}}\n'}
    line = {"p.csv": 3, "p.txt": 2, "p.jsonl": 1}[name]
    message = expect_error(write(tmp_path / name, body[name]), line=line, max_line_bytes=1000, contains=("longer than 1000",))
    assert "ZZZZ" not in message


def test_line_at_the_limit_is_fine(tmp_path: Path) -> None:
    text = "x" * 100
    corpus = read_corpus(write(tmp_path / "p.txt", b"\xef\xbb\xbf" + text.encode() + b"\r\n" + text.encode()), max_line_bytes=100)
    assert [p.text for p in corpus.prompts] == [text]
    assert len(corpus.duplicates) == 1


def test_invalid_utf8(tmp_path: Path) -> None:
    data = b"prompt\nfine\nbad \xff here\n"
    offset = data.index(b"\xff")
    expect_error(write(tmp_path / "p.csv", data), line=3, contains=(f"byte offset {offset}",))


def test_latin1_file(tmp_path: Path) -> None:
    expect_error(write(tmp_path / "p.txt", "ok\ncaf\xe9\n".encode("latin-1")), line=2, contains=("UTF-8", "byte offset 6"))


@pytest.mark.parametrize(
    ("line", "contains"),
    [
        ("[1, 2]", "JSON object"),
        ('"just a string"', "JSON object"),
        ('{"title": "x"}', "no 'prompt', 'caption' or 'text' field"),
        ('{"prompt": 3}', "must be a string"),
        ('{"prompt": "x", "type": "MM"}', "type"),
        ("{not json", "not valid JSON"),
        ("[" * 100_000, "not valid JSON"),
        ('{"prompt": "x", "Prompt": "y"}', "twice"),
    ],
)
def test_bad_jsonl_line(tmp_path: Path, line: str, contains: str) -> None:
    expect_error(write(tmp_path / "p.jsonl", '{"prompt": "ok"}\n\n' + line + "\n"), line=3, contains=(contains,))


@pytest.mark.parametrize("value", ["XM", "", "memorized"])
def test_bad_type(tmp_path: Path, value: str) -> None:
    path = write(tmp_path / "p.csv", PAPER_HEADER + f"0;ok;u;VM;;;1\n1;two;u;{value};;;2\n")
    expect_error(path, line=3, contains=("type",))


def test_image_outside_folder_refused(tmp_path: Path) -> None:
    outside = write(tmp_path / "secret.png", b"x")
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "link.png").symlink_to(outside)
    by_path = write(folder / "p.jsonl", json.dumps({"prompt": "x", "image": str(outside)}) + "\n")
    expect_error(by_path, line=1, contains=("outside",))
    by_link = write(folder / "q.jsonl", '{"prompt": "x"}\n{"prompt": "y", "image": "link.png"}\n')
    expect_error(by_link, line=2, contains=("outside",))


def test_missing_image(tmp_path: Path) -> None:
    expect_error(write(tmp_path / "p.csv", "prompt,image\nx,images/none.png\n"), line=2, contains=("not found",))


def test_message_stays_one_line_with_odd_values(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", 'prompt,type\nx,"V\nM\u2028"\n')
    expect_error(path, line=2, contains=("type",))


# --- properties: no input bytes raise anything but NemoError -----------------------------------

SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl")
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def read_or_nemo_error(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        corpus = read_corpus(path, max_line_bytes=4096)
    except NemoError as e:
        assert len(str(e).splitlines()) == 1
        assert str(path) in str(e)
    else:
        assert corpus.prompts
        assert all(p.text and p.text == p.text.strip() for p in corpus.prompts)
    assert path.read_bytes() == data


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("suffix", SUFFIXES)
@FUZZ
@given(data=st.binary(max_size=2000))
def test_arbitrary_bytes(fuzz_dir: Path, suffix: str, data: bytes) -> None:
    read_or_nemo_error(fuzz_dir / f"in{suffix}", data)


# Text built from the characters that matter to the parsers reaches far deeper than random bytes.
PIECES = st.sampled_from(
    [
        "prompt", "Caption", "type", "Index", "id", "image", "path", "VM", "tm", "x", "café", " ",
        ",", ";", "\t", "|", '"', '""', "\n", "\r\n", "\r", "{", "}", "[", "]", ":", '"prompt"',
        '"image"', '"type"', "null", "1", "../", "/", "\x00", "\u2028", "\ufeff", "images/a.png",
    ]
)
STRUCTURED = st.builds(
    lambda header, rows, bom, noise: (b"\xef\xbb\xbf" if bom else b"")
    + ("".join(header) + "\n" + "".join(rows)).encode("utf-8")
    + noise,
    st.lists(PIECES, max_size=8),
    st.lists(PIECES, max_size=60),
    st.booleans(),
    st.binary(max_size=4),
)


@pytest.mark.parametrize("suffix", SUFFIXES)
@FUZZ
@given(data=STRUCTURED)
def test_structured_text(fuzz_dir: Path, suffix: str, data: bytes) -> None:
    read_or_nemo_error(fuzz_dir / f"in{suffix}", data)


@FUZZ
@given(
    records=st.lists(
        st.dictionaries(
            st.sampled_from(["prompt", "Caption", "type", "id", "image", "other"]),
            st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), st.lists(st.integers(), max_size=2)),
        ),
        max_size=6,
    )
)
def test_jsonl_records(fuzz_dir: Path, records: list[dict]) -> None:
    read_or_nemo_error(fuzz_dir / "rec.jsonl", "\n".join(json.dumps(r) for r in records).encode("utf-8"))


def test_bundled_reference_is_what_its_script_writes() -> None:
    """The default reference prompts: 500 distinct captions, reproducible from the script that
    wrote them (no caption taken from a dataset)."""
    import runpy

    from nemo_surgery.corpus import bundled_reference

    script = Path(__file__).resolve().parents[1] / "examples" / "make_reference_prompts.py"
    want = runpy.run_path(str(script))["reference_prompts"]()
    got = read_corpus(bundled_reference())
    assert [p.text for p in got.prompts] == want and len(want) == len(set(want)) == 500
    assert not got.duplicates
