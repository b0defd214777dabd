// Run one GGUF file in a real llama.cpp (node-llama-cpp's prebuilt CPU build) for tests/test_llama_cpp.py.
//
//   node tests/llama_cpp/run.mjs MODEL.gguf OUT_DIR < request.json > answer.json
//
// request: {"prompts": [[token id, ...], ...], "generate": N, "stop": [id, ...], "probs": true,
//           "tokenize": ["text", ...], "threads": 2}
// answer:  {"llama_cpp": release tag, "generated": [[id, ...] per prompt], "tokens": [[id, ...] per text]}
//   and, with "probs", OUT_DIR/probs-<i>.f32 for prompt i: float32, (len(prompt), n_vocab), row t = llama.cpp's
//   next-token distribution after prompt[0..t] (softmax of the logits at temperature 1, nothing cut off).
//
// The prompts are token ids, evaluated as they are: no BOS is added and no chat wrapper runs. That is
// deliberate. node-llama-cpp's own chat wrappers render a conversation their way (its ChatML wrapper puts
// a BOS in front, which SmolLM2's template does not); the tests tokenize with transformers, the reference,
// and ask llama.cpp only to run the model. "tokenize" runs llama.cpp's own tokenizer (special tokens on),
// so that it can be compared with transformers'.
import fs from "node:fs";
import path from "node:path";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, outDir] = process.argv.slice(2);
const request = JSON.parse(fs.readFileSync(0, "utf8"));
// build "never": use the prebuilt binary from npm or fail; never download or compile llama.cpp
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath});
const longest = Math.max(8, ...(request.prompts ?? []).map((p) => p.length + (request.generate ?? 0)));
const context = await model.createContext({contextSize: longest + 8, batchSize: longest + 8,
                                           threads: request.threads ?? 2});
const sequence = context.getSequence();
const answer = {llama_cpp: llama.llamaCppRelease.release, generated: [], tokens: []};

for (const text of request.tokenize ?? [])
    answer.tokens.push(Array.from(model.tokenize(text, true)));

for (const [i, prompt] of (request.prompts ?? []).entries()) {
    await sequence.clearHistory();
    if (request.probs) {
        const items = prompt.map((t) => [t, {generateNext: {probabilities: true,
                                                             options: {temperature: 1, topK: 0, topP: 1, minP: 0}}}]);
        const results = await sequence.controlledEvaluate(items);
        let probs = null;
        results.forEach((result, t) => {
            const dist = result.next.probabilities;
            probs ??= new Float32Array(prompt.length * dist.size);
            for (const [token, p] of dist) probs[t * dist.size + token] = p;
        });
        fs.writeFileSync(path.join(outDir, `probs-${i}.f32`), Buffer.from(probs.buffer));
        await sequence.clearHistory();
    }
    const generated = [];
    if (request.generate) {
        for await (const token of sequence.evaluate(prompt, {temperature: 0})) {  // greedy: the argmax each step
            generated.push(token);
            if (generated.length >= request.generate || (request.stop ?? []).includes(token)) break;
        }
    }
    answer.generated.push(generated);
}
await context.dispose();
await model.dispose();
process.stdout.write(JSON.stringify(answer) + "\n");
