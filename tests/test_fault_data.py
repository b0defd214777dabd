"""Bad data: found before the model loads, every problem at once with file:line, and a fuzzed loader
that never crashes.

The fuzz feeds read_records -> detect_template -> build_examples (with SmolLM2's real
tokenizer and chat template) 200 seeded random files: truncated lines, random bytes,
invalid UTF-8, wrong types (numbers, lists, null, NaN where text belongs), missing
columns, broken chat turns, deep nesting, lone surrogates, U+2028 inside strings, a BOM,
empty files and 5 MB lines. The only acceptable outcomes are a DataError with a message,
or rows skipped with a problem naming the file, and the rest loaded intact.
"""
import json
import random

import pytest

from minilora import data as D
from minilora import train as T
from minilora.tokenizer import Tokenizer
from test_train import tiny_run_args, write_jsonl


@pytest.fixture(scope="module")
def tok(smollm2):
    return Tokenizer(smollm2)


class Loaded(Exception):
    """Raised instead of loading the model: the data stage is over."""


def stop_at_model_load(monkeypatch):
    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(T, "load_model", load)


BAD_TRAIN = [
    b'{"instruction": "Say 1", "output": "1"}',
    b'{"instruction": "a", "output": ',  # 2: truncated
    b'{"instruction": "caf\xe9", "output": "x"}',  # 3: latin-1, not UTF-8
    b'{"instruction": "no output"}',  # 4: a column missing
    b'{"instruction": "n", "output": 5}',  # 5: a number where text belongs
    b'[1, 2]',  # 6: not an object
    b'{"instruction": "Say 2", "output": "2"}',
    b'{"instruction": "x", "input": ["a"], "output": "y"}',  # 8: a list where text belongs
    b'{"instruction": null, "output": "y"}',  # 9: null
    b'{"text": "a stray row of another kind"}',  # 10: columns of another template
]
EXPECTED = ["bad.jsonl:2: malformed JSON line", "bad.jsonl:3: not valid UTF-8 (byte 21 of the line)",
            "bad.jsonl:4: column(s) ['output'] missing or not text; found ['instruction']",
            "bad.jsonl:5: column(s) ['output'] missing", "bad.jsonl:line 6: expected a JSON object, got list",
            "bad.jsonl:8: column 'input' must be text (or absent), got list", "bad.jsonl:9: column(s) ['instruction']",
            "bad.jsonl:10: column(s) ['instruction', 'output'] missing or not text; found ['text']",
            "bad-eval.jsonl:2: malformed JSON line"]


def bad_data_args(tmp_path, bad_rows):
    args = tiny_run_args(tmp_path, tmp_path / "o")  # (writes a good d.jsonl, which is not used)
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(BAD_TRAIN) + b"\n")
    (tmp_path / "bad-eval.jsonl").write_bytes(b'{"instruction": "Say 3", "output": "3"}\n{"instruction": }\n')
    args[args.index("--data") + 1] = str(tmp_path / "bad.jsonl")
    return args + ["--eval-data", str(tmp_path / "bad-eval.jsonl"), "--bad-rows", bad_rows]


def test_every_problem_at_once_before_the_model_loads(tmp_path, monkeypatch, capsys):
    stop_at_model_load(monkeypatch)  # raising DataError first proves the data was checked before the model
    with pytest.raises(SystemExit) as e:
        T.main(bad_data_args(tmp_path, "error"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"9 bad row(s) in {tmp_path / 'bad.jsonl'} and {tmp_path / 'bad-eval.jsonl'}:" in err
    for line in EXPECTED:
        assert f"{tmp_path}/{line}" in err, line
    assert "(pass --bad-rows skip to drop them)" in err and "Traceback" not in err


def test_skip_drops_the_bad_rows_and_counts_them(tmp_path, monkeypatch, capsys):
    stop_at_model_load(monkeypatch)
    with pytest.raises(Loaded):
        T.main(bad_data_args(tmp_path, "skip"))
    out = capsys.readouterr().out
    assert f"skipped 9 bad row(s) in {tmp_path / 'bad.jsonl'} and {tmp_path / 'bad-eval.jsonl'}:" in out
    assert "(pass --bad-rows skip" not in out
    assert "template: alpaca" in out  # from the columns most rows have, not from the first row
    assert "examples: {'kept': 2, 'truncated': 0, 'dropped': 0, 'no_label': 0, 'bad': 5}" in out


def test_nothing_left_after_skipping(tmp_path, monkeypatch):
    stop_at_model_load(monkeypatch)
    args = bad_data_args(tmp_path, "skip")
    write_jsonl(tmp_path / "bad.jsonl", [{"instruction": 1, "output": 2}, {"instruction": "a", "output": None}])
    with pytest.raises(D.DataError, match=r"bad.jsonl: no training examples left after filtering .*'bad': 2"):
        T.train(T.parse_config(args))


def test_eval_fraction_that_takes_every_example(tmp_path, monkeypatch):
    stop_at_model_load(monkeypatch)
    args = tiny_run_args(tmp_path, tmp_path / "o")
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Say {i}", "output": str(i)} for i in range(3)])
    args[args.index("--eval-fraction") + 1] = "0.9"  # round(2.7) = 3 of 3 held out
    with pytest.raises(D.DataError, match=r"--eval-fraction 0.9 holds out all 3 example\(s\) of .*d.jsonl for eval"):
        T.train(T.parse_config(args))


def test_a_tokenizer_of_another_model_stops_before_the_model_loads(tmp_path, monkeypatch):
    """SmolLM2's tokenizer (49,152 tokens) beside a model of 128: its ids would index past the embedding table."""
    stop_at_model_load(monkeypatch)
    args = tiny_run_args(tmp_path, tmp_path / "o")
    config = tmp_path / "m" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": 128}))
    with pytest.raises(D.DataError, match=r"gives token id \d+, past .*config.json's vocab_size 128: it is not this "
                                          r"model's tokenizer"):
        T.train(T.parse_config(args))


@pytest.mark.parametrize("case", ["a csv file", "a template that fits no row", "answers cut off"])
def test_a_whole_file_wrong_the_same_way_is_one_line(case, tmp_path, monkeypatch):
    """A file that is wrong as a whole is one line saying what to do, not the same problem once per row."""
    stop_at_model_load(monkeypatch)
    args = tiny_run_args(tmp_path, tmp_path / "o")
    data = tmp_path / "d.jsonl"
    if case == "a csv file":
        data = tmp_path / "d.csv"
        data.write_text("instruction,output\n" + "".join(f"Say {i},{i}\n" for i in range(30)))
        args[args.index("--data") + 1] = str(data)
        want = r"d.csv: none of its 31 row\(s\) is a JSON record \(the first: .*d.csv:1: malformed JSON line"
    elif case == "a template that fits no row":
        args += ["--template", "chat"]
        want = r"--template chat fits none of .*d.jsonl's rows, whose columns are \['instruction', 'output'\]; " \
               r"--template auto would take alpaca\.$"
    else:
        args[args.index("--max-seq-len") + 1 if "--max-seq-len" in args else len(args):] = ["--max-seq-len", "8"]
        want = r"no training examples left .*: --max-seq-len 8 left 40 of them no answer to train on; raise it\.$"
    with pytest.raises(D.DataError, match=want) as e:
        T.train(T.parse_config(args))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- fuzz

GOOD = {
    "alpaca": lambda i: {"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)},
    "r1": lambda i: {"Question": f"Is {i} even?", "Complex_CoT": "Look at the last digit.", "Response": "Yes."},
    "chat": lambda i: {"messages": [{"role": "user", "content": f"Hi {i}"},
                                    {"role": "assistant", "content": "Hello!"}]},
    "text": lambda i: {"text": f"Line number {i}."},
}
ODD = [None, 0, -1.5, 1e308, True, [], ["a"], {}, {"a": 1}, "", " ", "\u2028", "a\ud800b", "\x00", "é",
       float("nan"), float("inf")]
BROKEN_CHATS = [[], "hi", [1], [None], [{"role": 1, "content": "x"}], [{"role": "user", "content": ["x"]}],
                [{"role": "user", "content": "x"}], [{"role": "assistant"}], [{"content": "x"}],
                [{"role": "assistant", "content": None}]]


def dumps(value, rng) -> bytes:
    # ensure_ascii=False writes a lone surrogate raw, which no UTF-8 encoder accepts: its bytes are invalid
    return json.dumps(value, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def mutated(rng, rec: dict) -> bytes:
    line, kind = dumps(rec, rng), rng.randrange(10)
    if kind == 0:
        return line[: rng.randrange(len(line))]  # truncated
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))).replace(b"\n", b" ")
    if kind == 2:
        at = rng.randrange(len(line))
        return line[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80", b"\x00"]) + line[at:]
    rec = dict(rec)
    key = rng.choice(list(rec))
    if kind == 3:
        rec[key] = rng.choice(ODD)
    elif kind == 4:
        del rec[key]
    elif kind == 5:
        return dumps(rng.choice([[1, 2], 3, "a string", None, True, [rec]]), rng)
    elif kind == 6:
        return b"[" * rng.choice([10, 5000, 200_000])  # deeper than json's recursion limit
    elif kind == 7:
        rec["messages"] = rng.choice(BROKEN_CHATS)
    elif kind == 8:
        rec[key] = "a\u2028b\u2029c\x85d\x1ce\r\n"  # line breaks for str.splitlines, not for JSON lines
    else:
        return b"\xef\xbb\xbf" + line if rng.random() < 0.5 else b" \t" + line + b"\r"
    return dumps(rec, rng)


def fuzz_file(rng, folder, i):
    template = rng.choice(list(GOOD))
    n = rng.randint(0, 6)
    recs = [GOOD[template](j) for j in range(n)]
    if rng.random() < 0.15:  # a .json list, whole or damaged
        data = dumps([r if rng.random() < 0.6 else {**r, rng.choice(list(r)): rng.choice(ODD)} for r in recs], rng)
        if rng.random() < 0.3 and data:
            data = data[: rng.randrange(len(data))]
        path = folder / f"case{i}.json"
    else:
        lines = [dumps(r, rng) if rng.random() < 0.5 else mutated(rng, r) for r in recs]
        data = rng.choice([b"\n", b"\r\n"]).join(lines) + rng.choice([b"", b"\n", b"\n\n  \n"])
        path = folder / f"case{i}.jsonl"
    path.write_bytes(data)
    return path


SPECIAL = {  # the cases a random mix rarely makes
    "empty": b"",
    "blank lines": b"\n \n\t\n",
    "5 MB of random bytes": random.Random(0).randbytes(5 << 20).replace(b"\n", b" "),
    "5 MB JSON line, wrong type": json.dumps({"text": 5, "blob": "x" * (5 << 20)}).encode(),
    "1 MB of text to tokenize": json.dumps({"text": "word " * (1 << 18)}).encode(),
    "only a BOM": b"\xef\xbb\xbf",
}


def load(path, tok, bad_rows):
    recs, problems = D.read_records(path, bad_rows)
    if not recs:
        return recs, problems, [], None
    template = D.detect_template(D.common_columns(recs))
    examples, stats = D.build_examples(recs, template, tok, 64, "truncate", bad_rows)
    return recs, problems + stats.get("problems", []), examples, stats


def test_fuzzed_files_never_crash_the_loader(tmp_path, tok):
    rng = random.Random(1234)
    paths = {name: tmp_path / f"special{i}.jsonl" for i, name in enumerate(SPECIAL)}
    for name, path in paths.items():
        path.write_bytes(SPECIAL[name])
    paths.update({f"case {i}": fuzz_file(rng, tmp_path, i) for i in range(200)})
    seen = {"refused": 0, "rows skipped": 0, "clean": 0}
    for name, path in paths.items():
        for bad_rows in ("error", "skip"):
            try:
                recs, problems, examples, stats = load(path, tok, bad_rows)
            except D.DataError as e:
                assert str(e).strip(), name
                assert str(path) in str(e) or "fit no template" in str(e), (name, str(e)[:300])
                seen["refused"] += 1
                continue
            except Exception as e:  # anything else is a crash: show the input
                pytest.fail(f"{name} ({bad_rows}): {type(e).__name__}: {e}\n{path.read_bytes()[:300]!r}")
            if bad_rows == "error":
                assert not problems, name
            assert all(p.startswith(f"{path}:") for p in problems), (name, problems)
            if stats is not None:
                assert stats["kept"] + stats["dropped"] + stats["no_label"] + stats["bad"] == len(recs), name
            for ex in examples:
                assert len(ex.input_ids) == len(ex.labels) <= 64 and any(x != D.IGNORE for x in ex.labels[1:])
            seen["rows skipped" if problems else "clean"] += 1
    assert min(seen.values()) >= 20, seen  # the fuzz reached every outcome, often
