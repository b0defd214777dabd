"""Generation against transformers' `generate` (and peft for adapters) on the real SmolLM2 model.

Greedy decoding is compared token for token. Both sides run in fp32 on the CPU, where the
logits agree to ~1e-5 (tests/test_model.py); a greedy choice could only flip on a near tie
smaller than that, which these prompts do not have. Sampling cannot be compared token for token
(the random streams differ), so its filtering is compared with transformers' logits warpers,
and the draw itself only has to be reproducible from its seed.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilora.adapter import adapter_config, load_adapter, save_adapter
from minilora.checkpoint import load_model
from minilora.generate import Streamer, filter_logits, generate, model_eos_ids, visible_text
from minilora.lora import apply_lora
from minilora.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three prime numbers and explain why each is prime."]


@pytest.fixture(scope="module")
def tok(smollm2):
    return Tokenizer(smollm2)


@pytest.fixture(scope="module")
def ours(smollm2):
    return load_model(smollm2, quantize=None, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def hf(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


def chat_ids(tok, question):
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def hf_greedy(model, ids, max_new_tokens, eos):
    """transformers' greedy continuation of one unpadded prompt: new tokens, ending at its first EOS."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    new = out[0, len(ids):].tolist()
    for i, t in enumerate(new):  # transformers pads a finished row; the answer ends at its first EOS
        if t in eos:
            return new[: i + 1]
    return new


@pytest.fixture(scope="module")
def refs(hf, tok):
    """transformers' greedy answers (up to 20 tokens) to each question, computed once for every test here."""
    return {q: hf_greedy(hf, chat_ids(tok, q), 20, [tok.eos_id]) for q in QUESTIONS}


# ----------------------------------------------------------------------------- greedy parity


def test_greedy_matches_transformers(ours, tok, refs):
    q = QUESTIONS[1]
    streamed = []
    got = generate(ours, [chat_ids(tok, q)], 20, eos_ids=[tok.eos_id],
                   on_token=lambda row, t: streamed.append((row, t)))[0]
    assert len(refs[q]) == 20  # a full-length answer: all 20 steps are compared
    assert got == refs[q]
    assert streamed == [(0, t) for t in got]
    assert not ours.training and all(layer.self_attn.cache is None for layer in ours.model.layers)


def test_batched_left_padded_equals_unbatched(ours, tok, refs):
    """Three prompts of different lengths in one left-padded batch give, token for token, what
    transformers gives for each prompt alone; the first stops at its EOS while the others go on."""
    prompts = [chat_ids(tok, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == 3
    batched = generate(ours, prompts, 12, eos_ids=[tok.eos_id], pad_id=tok.pad_id)
    assert batched == [refs[q][:12] for q in QUESTIONS]
    assert batched[0][-1] == tok.eos_id and len(batched[0]) < 12
    assert len(batched[1]) == len(batched[2]) == 12


def test_stops_at_first_eos_of_several(ours, tok, refs):
    q = QUESTIONS[0]
    full = generate(ours, [chat_ids(tok, q)], 20, eos_ids=[tok.eos_id])[0]
    assert full == refs[q]
    assert full[-1] == tok.eos_id and len(full) < 20  # stopped by <|im_end|>, not by the limit
    # Any of several EOS ids ends the answer: make the third answer token an EOS id too.
    cut = generate(ours, [chat_ids(tok, q)], 20, eos_ids=[tok.eos_id, full[2]])[0]
    assert cut == full[:3]


# ----------------------------------------------------------------------------- with a LoRA adapter


def test_adapter_matches_peft(smollm2, tok, refs, tmp_path):
    """An adapter built by minilora and saved in PEFT's format: peft's model over transformers
    must answer as minilora's model with the same adapter loaded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = load_model(smollm2, quantize=None, dtype=torch.float32, progress=False)
    torch.manual_seed(0)  # A's random init and B below; with this seed the closest greedy choice wins by 0.1
    apply_lora(model, r=8, alpha=16, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.05)  # B = 0 would make the adapter a no-op
    save_adapter(model, tmp_path / "adapter",
                 adapter_config(model, str(smollm2), r=8, alpha=16, dropout=0.0, rslora=False))
    del model
    ours = load_model(smollm2, quantize=None, dtype=torch.float32, progress=False)
    load_adapter(ours, tmp_path / "adapter")

    q = QUESTIONS[1]
    got = generate(ours, [chat_ids(tok, q)], 12, eos_ids=[tok.eos_id])[0]
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32),
                                    tmp_path / "adapter").eval()
    assert got == hf_greedy(ref, chat_ids(tok, q), 12, [tok.eos_id])
    assert got != refs[q][:12]  # the adapter really changed the answer


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0),
                                                      (1.3, 0, 0.8), (0.8, 20, 0.9), (1.0, 0, 0.01)])
def test_filtering_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(4, 200) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])  # the order transformers uses
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    want = warpers(None, logits.clone()).softmax(-1)
    got = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert ((got > 0).sum(-1) <= (top_k or 200)).all()


def test_sampling_is_reproducible_from_its_seed(ours, tok):
    ids = chat_ids(tok, QUESTIONS[1])
    kw = dict(eos_ids=[tok.eos_id], temperature=1.5, top_p=0.98)
    a = generate(ours, [ids], 8, seed=1, **kw)
    assert a == generate(ours, [ids], 8, seed=1, **kw)
    assert a != generate(ours, [ids], 8, seed=2, **kw)  # at temperature 1.5, 8 equal draws are vanishingly rare


def test_top_k_1_sampling_is_greedy(ours, tok, refs):
    q = QUESTIONS[1]
    got = generate(ours, [chat_ids(tok, q)], 8, eos_ids=[tok.eos_id], temperature=1.5, top_k=1, seed=0)[0]
    assert got == refs[q][:8]


# ----------------------------------------------------------------------------- EOS ids


def test_eos_ids_collects_every_source(smollm2, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(smollm2 / f, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["eos_token_id"] = [2, 0]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    ids = model_eos_ids(tmp_path, Tokenizer(tmp_path))
    want = {AutoTokenizer.from_pretrained(tmp_path).eos_token_id, *GenerationConfig.from_pretrained(tmp_path).eos_token_id}
    assert set(ids) == want | {2, 0} and len(ids) == len(set(ids))  # {2, 0, 7}, no repeats
    assert ids[0] == 2  # the tokenizer's own eos first


# ----------------------------------------------------------------------------- streaming text


def test_hide_think_streams_only_growing_text():
    answer = "<think>\nLet me think: 2+2 is 4.\n</think>\n\nThe answer is 4 €."
    want = "[thinking…]\nThe answer is 4 €."
    assert visible_text(answer, hide_think=True, final=True) == want
    assert visible_text(answer, hide_think=False, final=True) == answer
    # A prompt that opened the section itself (DeepSeek-R1's template ends with "<think>\n").
    assert visible_text(answer[len("<think>"):], hide_think=True, in_think=True, final=True) == want
    # Streamed one character at a time (tags split anywhere), the shown text only grows and ends right.
    for hide, final_text in ((True, want), (False, answer)):
        shown = ""
        for i in range(1, len(answer) + 1):
            v = visible_text(answer[:i], hide_think=hide)
            assert v.startswith(shown), (answer[:i], shown, v)
            shown = v
        assert visible_text(answer, hide_think=hide, final=True) == final_text


def test_streamer_prints_multibyte_characters_whole(tok):
    import io

    text = "Crème brûlée, 東京, emoji 🙂 done."
    ids = tok.encode(text, add_special_tokens=False)
    out = io.StringIO()
    s = Streamer(tok, hide_think=False, in_think=False, out=out)
    for t in ids:
        s(0, t)
        assert "\ufffd" not in out.getvalue()
    s.finish()
    assert out.getvalue() == tok.decode(ids) + "\n" == text + "\n"


# ----------------------------------------------------------------------------- the command


def run_cli(*args, input=None, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "minilora.generate", *map(str, args)], input=input,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_cli_answers_a_chat_prompt(smollm2):
    r = run_cli("--model", smollm2, "--prompt", "What is the capital of France?", "--max-new-tokens", 12,
                "--no-4bit", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tokens/s" in r.stderr and "tokens/s" not in r.stdout


def test_cli_chat_keeps_history(smollm2):
    """Two turns on stdin, then EOF; the second answer must see the first turn to name the city again."""
    r = run_cli("--model", smollm2, "--chat", "--no-4bit", "--device", "cpu", "--max-new-tokens", 10,
                input="What is the capital of France?\nWhat city did you just name? Answer with one word.\n")
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().split("\n", 1)
    assert "Paris" in first and "Paris" in second
    assert r.stderr.count("tokens/s") == 2


def test_cli_bad_model_path_is_a_one_line_error(tmp_path):
    """minilora's message is one line (that no other library's line reaches stderr is test_quiet.py's to check,
    on a CPU where bitsandbytes would print one)."""
    r = run_cli("--model", tmp_path / "nope", "--prompt", "hi")
    assert r.returncode == 2
    ours = [line for line in r.stderr.splitlines() if line.startswith("minilora.generate:")]
    assert len(ours) == 1 and ours[0].startswith("minilora.generate: error: --model ") and "no such folder" in ours[0]
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_cli_bad_adapter_is_a_one_line_error(smollm2, tmp_path, capsys):
    from minilora.generate import main

    code = main(["--model", str(smollm2), "--adapter", str(tmp_path), "--prompt", "hi", "--no-4bit", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"minilora.generate: error: --adapter {tmp_path}: ") and "adapter_config.json" in err
    assert err.count("\n") == 1


def test_bad_prompts_are_named(ours):
    with pytest.raises(ValueError, match="prompt 1 holds token ids outside the model's vocabulary"):
        generate(ours, [[1, 2], [5, 49152]], 2, eos_ids=[2])
    with pytest.raises(ValueError, match="at least one token"):
        generate(ours, [[1, 2], []], 2, eos_ids=[2])


def test_an_alpaca_adapter_is_prompted_in_alpaca(tmp_path):
    """Trained on alpaca records, the adapter keeps the alpaca prompt as its chat template, and generate --adapter
    (its --model left out: the base the adapter names) renders a question into the very prompt the training masked
    (not the tokenizer's ChatML)."""
    from minilora import data as D
    from minilora import generate as G
    from test_train import run_train, tiny_run_args

    out = tmp_path / "o"
    r = run_train(tiny_run_args(tmp_path, out, max_steps=1, save_every=0))
    assert r.returncode == 0, r.stderr
    args = G.build_parser().parse_args(["--adapter", str(out / "adapter"), "--prompt", "Say 3", "--no-4bit",
                                        "--device", "cpu"])  # --model left out: the base the adapter names
    _, tok, _ = G.load(args, torch.device("cpu"))
    assert args.model == str(tmp_path / "m")
    prompt = G.render(tok, [{"role": "user", "content": "Say 3"}])
    assert prompt == D.render({"instruction": "Say 3", "output": "3"}, "alpaca", tok)[0]
    assert "<|im_start|>" not in prompt
