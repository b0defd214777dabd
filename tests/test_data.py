"""Data: prompt masking for each template, EOS, padding, and errors that name file and line."""
import json

import jinja2
import pytest

from minilora import data as D
from minilora.hub_data import dataset_files, fetch_hub_dataset
from minilora.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(smollm2):
    return Tokenizer(smollm2)


RECORDS = {
    "alpaca": {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    "r1": {"Question": "Is 7 prime?", "Complex_CoT": "7 has no divisors but 1 and 7.", "Response": "Yes."},
    "chat": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]},
    "text": {"text": "Just some text to learn."},
}
RESPONSES = {"alpaca": "5", "r1": "<think>\n7 has no divisors but 1 and 7.\n</think>\nYes.",
             "chat": "Hello there!<|im_end|>\n", "text": "Just some text to learn."}


def example(rec, template, tok):
    if template == "chat":  # chat.py: a label span per assistant turn (tests/test_chat.py)
        ex = D.build_examples([rec], "chat", tok, 512)[0][0]
        return tok.apply_chat_template(rec["messages"][:-1], add_generation_prompt=True), ex
    prompt, full = D.render(rec, template, tok)
    return prompt, D.tokenize(prompt, full, tok)


@pytest.mark.parametrize("template", list(RECORDS))
def test_labels_are_exactly_the_response_plus_eos(tok, template):
    rec = RECORDS[template]
    assert D.detect_template(set(rec)) == template
    prompt, ex = example(rec, template, tok)
    labelled = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != D.IGNORE]
    assert ex.labels[: len(ex.labels) - len(labelled)] == [D.IGNORE] * (len(ex.labels) - len(labelled))
    eos = "" if template == "chat" else tok.eos_token  # the chat response already ends with <|im_end|>
    assert tok.decode(labelled) == RESPONSES[template] + eos
    # the unlabelled ids are exactly the prompt as the tokenizer encodes it alone
    n_prompt = len(ex.labels) - len(labelled)
    if template != "text":
        assert ex.input_ids[:n_prompt] == tok.encode(prompt, add_special_tokens=template != "chat")


def test_prompt_pairs_use_chat_template(tok):
    rec = {"prompt": "Hi", "chosen": "Hello there!", "rejected": "Go away."}
    assert D.detect_template(set(rec)) == "chat"
    ex = D.build_examples([rec], "chat", tok, 512)[0][0]
    full = tok.decode(ex.input_ids)
    assert full.endswith("<|im_start|>assistant\nHello there!<|im_end|>\n") and "Go away" not in full


def test_pad_is_never_eos(tok):
    assert tok.pad_id == tok.eos_id  # SmolLM2 ships pad = eos = <|im_end|> ...
    assert D.pad_id_for(tok) != tok.eos_id  # ... so we pad with another id
    a, b = D.Example([1, 2, 3], [D.IGNORE, 2, 3]), D.Example([4], [4])
    batch = D.collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[D.IGNORE, 2, 3], [4, D.IGNORE, D.IGNORE]]


def test_truncate_or_drop(tok):
    recs = [{"text": "word " * 200}, {"text": "short"}]
    ex, stats = D.build_examples(recs, "text", tok, max_seq_len=32, truncation="truncate")
    assert stats["truncated"] == 1 and max(len(e.input_ids) for e in ex) == 32
    ex, stats = D.build_examples(recs, "text", tok, max_seq_len=32, truncation="drop")
    assert stats["dropped"] == 1 and len(ex) == 1


def test_malformed_jsonl_names_every_bad_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken}\n\n[1, 2]\n{"text": "fine"}\n')
    with pytest.raises(D.DataError) as e:
        D.read_records(f)
    assert f"{f}:2: malformed JSON" in str(e.value) and f"{f}:line 4: expected a JSON object" in str(e.value)
    recs, problems = D.read_records(f, bad_rows="skip")
    assert [r["text"] for r in recs] == ["ok", "fine"] and len(problems) == 2


def test_json_list_and_non_utf8(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert len(D.read_records(f)[0]) == 2
    g = tmp_path / "bad.jsonl"
    g.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(D.DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        D.read_records(g)


def test_missing_columns_name_found_columns_and_templates():
    with pytest.raises(D.DataError, match=r"columns \['answer', 'query'\] fit no template.*alpaca: instruction, output"):
        D.detect_template({"query", "answer"})


def test_missing_field_in_one_row(tok):
    rec = {"instruction": "x", "_where": "f.jsonl:7"}
    with pytest.raises(D.DataError, match=r"f.jsonl:7: column\(s\) \['output'\] missing"):
        D.render(rec, "alpaca", tok)


# ---- hub data sets: which files `org/name[:config][@split]` reads, against `datasets.load_dataset` on the same folder

MEDICAL_O1_CARD = """---
license: apache-2.0
configs:
- config_name: en
  data_files: medical_o1_sft.json
- config_name: zh
  data_files: medical_o1_sft_Chinese.json
- config_name: en_mix
  data_files:
  - split: train
    path: medical_o1_sft_mix.json
---
"""
DEFAULT_CARD = """---
configs:
- config_name: small
  data_files: [{split: train, path: "small/*.jsonl"}]
- config_name: full
  default: true
  data_files: [{split: train, path: "full/train-*.jsonl"}, {split: test, path: "full/test.jsonl"}]
---
"""
LAYOUTS = {  # a data set repo's files: path -> its records' Question column
    "medical-o1": {"README.md": MEDICAL_O1_CARD, "medical_o1_sft.json": ["en1", "en2"],
                   "medical_o1_sft_Chinese.json": ["zh1", "zh2"], "medical_o1_sft_mix.json": ["mix1"]},
    "a default config": {"README.md": DEFAULT_CARD, "small/a.jsonl": ["s1"], "full/train-0.jsonl": ["f1"],
                         "full/train-1.jsonl": ["f2", "f3"], "full/test.jsonl": ["t1"]},
    "splits in file names": {"train.jsonl": ["tr1"], "test.jsonl": ["te1"], "data/validation-00000.jsonl": ["v1"],
                             "data/pretrain_notes.jsonl": ["p1"], "dataset_info.json": None},
    "shards": {"data/train-00000-of-00002.jsonl": ["a"], "data/train-00001-of-00002.jsonl": ["b", "c"]},
    "no split words": {"conversations.json": ["c1", "c2"], "more_data.jsonl": ["c3"]},
}
ASKS = [("", ""), ("", "train"), ("", "test"), ("", "validation"), ("zh", ""), ("en", ""), ("en_mix", ""),
        ("en", "test"), ("xx", ""), ("small", ""), ("full", "test")]


def write_layout(folder, files):
    for rel, rows in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel == "README.md":
            path.write_text(rows)
        elif rows is None:  # a repo's own metadata file, not data
            path.write_text(json.dumps({"description": "not a record"}))
        elif rel.endswith(".json"):
            path.write_text(json.dumps([{"Question": q, "Response": "r"} for q in rows]))
        else:
            path.write_text("".join(json.dumps({"Question": q, "Response": "r"}) + "\n" for q in rows))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hub_data_set_files_are_the_ones_datasets_reads(layout, tmp_path, monkeypatch):
    """Each config and split asked of each layout: the same records as `datasets.load_dataset(folder, config,
    split=split or "train")` (the seeds load medical-o1's "zh" this way), or an error where it refuses."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    folder = tmp_path / "repo"
    write_layout(folder, LAYOUTS[layout])
    checked = 0
    for config, split in ASKS:
        try:
            ref = datasets.load_dataset(str(folder), config or None, split=split or "train",
                                        cache_dir=str(tmp_path / "cache"))["Question"]
        except (ValueError, FileNotFoundError):
            ref = None
        try:
            ours = [r["Question"] for f in dataset_files(folder, config, split or "train", "org/data")
                    for r in D.read_records(f)[0]]
        except D.DataError as e:
            assert "org/data" in str(e)  # the message names the data set
            ours = None
        assert (sorted(ours) if ours else ours) == (sorted(ref) if ref else ref), (config, split)
        checked += ref is not None
    assert checked >= 1  # each layout has a split that loads


def test_a_folder_given_as_data_says_so(tmp_path):
    with pytest.raises(D.DataError, match="a folder; --data takes one .json or .jsonl file"):
        D.read_records(tmp_path)


def test_fetch_hub_dataset_says_which_files_it_reads(tmp_path, monkeypatch, capsys):
    """The seeds' `load_dataset("FreedomIntelligence/medical-o1-reasoning-SFT", "zh", split="train")` as --data:
    the Chinese file, named on the console (the download itself stood in for: the tests are offline)."""
    import huggingface_hub

    write_layout(tmp_path, LAYOUTS["medical-o1"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path))
    files = fetch_hub_dataset("FreedomIntelligence/medical-o1-reasoning-SFT:zh@train")
    assert files == [tmp_path / "medical_o1_sft_Chinese.json"]
    assert "medical-o1-reasoning-SFT:zh@train: medical_o1_sft_Chinese.json" in capsys.readouterr().out


@pytest.mark.parametrize("tokenizer", ["smollm2", "deepseek_r1"])
@pytest.mark.parametrize("template", ["alpaca", "r1"])
def test_the_saved_prompt_template_prompts_as_training_did(template, tokenizer, request):
    """What generate feeds the model through the adapter's saved template (rendered, then encoded without special
    tokens) is, id for id, the prompt the training masked; an answer then closes with EOS, as trained. With the real
    SmolLM2 (no BOS) and DeepSeek-R1-Distill (BOS) tokenizers."""
    tok = Tokenizer(request.getfixturevalue(tokenizer))
    tok.set_chat_template(D.prompt_template(template, tok))
    rec = RECORDS[template]
    question = rec["instruction"] if template == "alpaca" else rec["Question"]
    prompt, full = D.render(rec, template, tok)
    trained = D.tokenize(prompt, full, tok)
    n_prompt = trained.labels.count(D.IGNORE)
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    assert tok.encode(text, add_special_tokens=False) == trained.input_ids[:n_prompt]
    answer = full[len(prompt):]
    text = tok.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    assert tok.encode(text, add_special_tokens=False) == trained.input_ids
    with pytest.raises(jinja2.TemplateError, match=f"the {template} prompt format .* has no system message"):
        tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}])


def test_text_and_chat_data_save_no_prompt_template(tok):
    assert D.prompt_template("text", tok) is None and D.prompt_template("chat", tok) is None
