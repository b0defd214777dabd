// Run one GGUF file in a real llama.cpp (node-llama-cpp's prebuilt CPU build) for tests/test_llama_cpp.py.
//
//   node tests/llama_cpp/run.mjs OUT_DIR MODEL.gguf [MODEL.gguf ...] < request.json > answers.json
//
// Each model is loaded in turn (one process: node and llama.cpp start once) and answers the same request,
// one JSON line per model, in order.
// request: {"prompts": [[token id, ...], ...], "generate": N, "stop": [id, ...], "probs": true,
//           "tokenize": ["text", ...], "chat": [{"role": ..., "content": ...}, ...], "threads": 1}
// answer:  {"llama_cpp": release tag, "generated": [[id, ...] per prompt], "tokens": [[id, ...] per text],
//           "chat": {"default": ids, "jinja": ids}}
//   and, with "probs", OUT_DIR/<model k>/probs-<i>.f32 for prompt i: float32, (len(prompt), n_vocab), row t = llama.cpp's
//   next-token distribution after prompt[0..t] (softmax of the logits at temperature 1, nothing cut off).
//
// The prompts are token ids, evaluated as they are: no BOS is added and no chat wrapper runs. That is
// deliberate. node-llama-cpp's own chat wrappers render a conversation their way (its ChatML wrapper puts
// a BOS in front, which SmolLM2's template does not); the tests tokenize with transformers, the reference,
// and ask llama.cpp only to run the model. "tokenize" runs llama.cpp's own tokenizer (special tokens on),
// so that it can be compared with transformers'. "chat" renders a conversation (with the assistant's turn
// opened) the two ways a node-llama-cpp user would: the chat wrapper it picks for the model by default,
// and JinjaTemplateChatWrapper given the model's own template from the GGUF.
import fs from "node:fs";
import path from "node:path";
import {getLlama, JinjaTemplateChatWrapper, LlamaLogLevel, resolveChatWrapper} from "node-llama-cpp";

const [outDir, ...modelPaths] = process.argv.slice(2);
const request = JSON.parse(fs.readFileSync(0, "utf8"));
// build "never": use the prebuilt binary from npm or fail; never download or compile llama.cpp
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});

async function run(modelPath, dir) {
    const model = await llama.loadModel({modelPath});
    const longest = Math.max(8, ...(request.prompts ?? []).map((p) => p.length + (request.generate ?? 0)));
    // One thread by default: llama.cpp's threads spin while they wait for each other, and on a busy CI
    // machine (more runnable processes than cores) 2 threads ran a tiny model 7x slower than 1.
    const context = await model.createContext({contextSize: longest + 8, batchSize: longest + 8,
                                               threads: request.threads ?? 1});
    const sequence = context.getSequence();
    const answer = {llama_cpp: llama.llamaCppRelease.release, model: modelPath, generated: [], tokens: []};

    for (const text of request.tokenize ?? [])
        answer.tokens.push(Array.from(model.tokenize(text, true)));

    if (request.chat) {
        const turn = ({role, content}) => role === "assistant" ? {type: "model", response: [content]}
            : {type: role, text: content};  // "system" and "user" keep their names
        const chatHistory = [...request.chat.map(turn), {type: "model", response: []}];
        const template = model.fileInfo.metadata.tokenizer.chat_template;
        answer.chat = {};
        for (const [name, wrapper] of [["default", resolveChatWrapper(model)],
                                       ["jinja", new JinjaTemplateChatWrapper({template})]]) {
            const {contextText} = wrapper.generateContextState({chatHistory});
            answer.chat[name] = Array.from(contextText.tokenize(model.tokenizer));
            answer.chat[name + "_wrapper"] = wrapper.wrapperName;
        }
    }

    for (const [i, prompt] of (request.prompts ?? []).entries()) {
        await sequence.clearHistory();
        if (request.probs) {
            const options = {temperature: 1, topK: 0, topP: 1, minP: 0};  // the whole distribution, as it is
            const results = await sequence.controlledEvaluate(
                prompt.map((t) => [t, {generateNext: {probabilities: true, options}}]));
            let probs = null;
            results.forEach((result, t) => {
                const dist = result.next.probabilities;
                probs ??= new Float32Array(prompt.length * dist.size);
                for (const [token, p] of dist) probs[t * dist.size + token] = p;
            });
            fs.writeFileSync(path.join(dir, `probs-${i}.f32`), Buffer.from(probs.buffer));
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
    return answer;
}

for (const [k, modelPath] of modelPaths.entries()) {
    const dir = path.join(outDir, String(k));
    fs.mkdirSync(dir, {recursive: true});
    process.stdout.write(JSON.stringify(await run(modelPath, dir)) + "\n");
}
