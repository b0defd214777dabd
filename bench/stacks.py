"""The three QLoRA stacks under test, each reduced to the same two things:

    run = load(stack, folder, settings)   # checkpoint folder -> NF4 base + LoRA + optimizer
    loss = run.step(input_ids, lengths)   # forward, backward, clip 1.0, AdamW8bit step

Everything a reader would want held equal is held equal here:
- the weights: one checkpoint folder (bench/shapes.py), loaded by each stack's own loader;
- NF4 with double quantization, bf16 compute (fp32 on the CPU), lm_head and embeddings unquantized;
- LoRA r/alpha on q,k,v,o,gate,up,down, no dropout, no bias, fp32 factors, B = 0 at the start;
- the optimizer: minilora.train.make_optimizer (bitsandbytes AdamW8bit, lr 2e-4, weight decay 0.01),
  the same function for every stack, then clip_grad_norm_(1.0); minilora hands it its factors as one
  flat tensor, as its trainer does (speed/flat_optimizer.py: the same update, one launch);
- the loss: mean token cross-entropy with labels = input_ids (every token labelled); with
  `lengths` (train_speed.py --lengths), rows are right-padded and pad positions are unlabelled
  and masked out of attention, as a padded SFT batch is.

What differs is each stack's own model code, kernels, gradient checkpointing and loss.
Each loader imports its own stack when called: `import unsloth` must run before
transformers is imported (it patches it), and the parent processes of the
benchmarks, which only write checkpoints and collect rows, stay light.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

STACKS = ("minilora", "minilora-fast", "minilora-lean", "minilora-padfree", "minilora-graphs", "minilora-fast-graphs",
          "minilora-lean-graphs", "peft", "peft-fast", "unsloth")
# minilora's modes (train.py flags): minilora = --gradient-checkpointing --cuda-graphs off;
# fast = --no-gradient-checkpointing (keep every activation, no recompute); lean = --offload (layer inputs and embedding table in host memory);
# padfree = --padding-free (a batch's rows end to end, no pad tokens; the same as minilora on full rows);
# graphs = --cuda-graphs on (each micro-batch's forward and backward replayed from a CUDA graph, speed/graphs.py; the
# trainer's default on a GPU, --cuda-graphs auto); fast-graphs and lean-graphs: what --no-gradient-checkpointing and
# --offload give on a GPU.
MINILORA_MODES = {"minilora": {}, "minilora-fast": {"gradient_checkpointing": False}, "minilora-lean": {"offload": True},
                  "minilora-padfree": {"padding_free": "on"}, "minilora-graphs": {"cuda_graphs": True},
                  "minilora-fast-graphs": {"gradient_checkpointing": False, "cuda_graphs": True},
                  "minilora-lean-graphs": {"offload": True, "cuda_graphs": True}}
# peft-fast = peft without gradient checkpointing: shared/GPU.md's peft reference for the 1.5B shape (13,196 tok/s
# at 25.5 GiB) has the memory of a run that keeps every activation, not of peft's recompute (~9 GiB here).
NO_RECOMPUTE = ("minilora-fast", "minilora-fast-graphs", "peft-fast")  # whatever --checkpointing says
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # minilora's ALL_TARGETS


@dataclass
class Settings:
    rank: int = 16
    alpha: float = 16.0
    checkpointing: bool = True  # recompute each decoder layer in backward ("unsloth" mode for unsloth)
    compile: str = "auto"  # minilora only: torch.compile each decoder layer (auto: on CUDA), as its trainer does
    keep_activations: int = 0  # minilora only: the last N layers are not recomputed (train.py --keep-activations)
    max_seq: int = 2048  # unsloth sizes its RoPE cache by it
    device: str = "cuda"
    lr: float = 2e-4
    seed: int = 0  # LoRA A init (B starts at 0, so the first loss does not depend on it)

    @property
    def dtype(self) -> torch.dtype:
        """bf16 on the GPU, as everyone trains; fp32 on the CPU, where bf16 matmuls are slow and inexact."""
        return torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32

    def autocast(self):
        dev = torch.device(self.device).type
        return torch.autocast(dev, dtype=self.dtype, enabled=dev == "cuda")


@dataclass
class Run:
    model: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    loss_backward: Callable  # (input_ids, lengths) -> forward + backward of one batch, returns the mean loss
    quant: str = "nf4-dq"
    graphs: object = None  # minilora-graphs: its graphs.GraphedMicroBatches

    def step(self, input_ids: torch.Tensor, lengths: list[int] | None = None) -> float:
        """One optimizer step on `input_ids` (B, T): every token labelled, or row i's first lengths[i] only."""
        loss = self.loss_backward(input_ids, lengths)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def _finish(model, s: Settings, loss_backward, params=None) -> Run:
    from minilora.train import TrainConfig, make_optimizer

    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters after applying LoRA")
    opt = make_optimizer(params, TrainConfig(lr=s.lr, optim="adamw8bit"))
    return Run(model, params, opt, loss_backward)


def load_minilora(folder, s: Settings, mode: str = "minilora") -> Run:
    """load_model (NF4 as tensors arrive), apply_lora, the speed machinery attached (speed.configure: recompute,
    compiled layers, the flat optimizer, CUDA graphs) and train_step: the code `python -m minilora.train` runs."""
    import functools

    from minilora import speed
    from minilora.checkpoint import load_model
    from minilora.data import Example
    from minilora.lora import apply_lora
    from minilora.speed.graphs import bucket_length
    from minilora.train import TrainConfig, micro_step, train_step

    model = load_model(folder, device=s.device, dtype=s.dtype, quantize="nf4", double_quant=True, progress=False)
    torch.manual_seed(s.seed)
    apply_lora(model, r=s.rank, alpha=s.alpha, dropout=0.0, targets=TARGETS)
    opts = {"gradient_checkpointing": s.checkpointing, "padding_free": "off", **MINILORA_MODES[mode]}
    graphed = opts.pop("cuda_graphs", False)
    fast = speed.configure(TrainConfig(compile=s.compile, keep_activations=s.keep_activations,
                                       cuda_graphs="on" if graphed else "off", **opts), s.device)
    params = fast.attach(model)  # the factors as one flat tensor, as the trainer steps them
    autocast = s.autocast()
    micro = fast.record(functools.partial(micro_step, model, autocast=autocast, loss=fast.loss), params)

    def loss_backward(ids, lengths=None):
        if fast.padding_free and lengths:
            rows = [row[:n].tolist() for row, n in zip(ids, lengths)]  # ids on the host (train_speed.py)
            batch = fast.make_batch([Example(r, r) for r in rows], 0)
        else:
            on_device = ids.to(s.device)
            batch = {"input_ids": on_device, "labels": padded_labels(on_device, lengths)}
            if fast.host_embedding is not None:  # rows looked up from the host's ids, as make_batch does
                batch["inputs_embeds"] = fast.host_embedding(ids)
            if graphed and bucket_length(ids.shape[1]) != ids.shape[1]:  # train.py would pad it
                raise ValueError(f"minilora-graphs: --seq {ids.shape[1]} is not a recorded length; the trainer "
                                 f"would pad it to {bucket_length(ids.shape[1])}")
        loss, _ = train_step(model, [batch], autocast, micro=micro)
        return float(loss)

    run = _finish(model, s, loss_backward, params)
    run.graphs = micro if graphed else None
    return run


def padded_labels(ids: torch.Tensor, lengths) -> torch.Tensor:
    """labels = input_ids, with -100 (every stack's "ignore") past each row's length."""
    if not lengths:
        return ids
    pad = torch.arange(ids.shape[1], device=ids.device)[None, :] >= torch.tensor(lengths, device=ids.device)[:, None]
    return ids.masked_fill(pad, -100)


def _hf_loss_backward(model, s: Settings):
    autocast = s.autocast()

    def loss_backward(ids, lengths=None):
        labels = padded_labels(ids, lengths)
        mask = None if not lengths else (labels != -100).long()  # right padding: pads are never attended to
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss  # mean over labels
        loss.backward()
        return loss.item()

    return loss_backward


def load_peft(folder, s: Settings) -> Run:
    """transformers + bitsandbytes 4-bit + peft, set up as the QLoRA notebooks do, minus
    prepare_model_for_kbit_training (it upcasts norms and embeddings to fp32, which minilora
    and unsloth do not do, and which would change the memory being compared)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=s.dtype)
    device = torch.cuda.current_device() if torch.device(s.device).type == "cuda" else "cpu"
    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=q, dtype=s.dtype, attn_implementation="sdpa", device_map={"": device},
        output_loading_info=True)
    wrong = [k for key in ("missing_keys", "unexpected_keys", "mismatched_keys") for k in info.get(key) or []]
    if wrong:  # the weights would not be the ones minilora trains
        raise RuntimeError(f"transformers did not load every checkpoint tensor: {wrong[:5]}")
    if s.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(s.seed)
    cfg = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=0.0, target_modules=list(TARGETS), bias="none",
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    return _finish(model, s, _hf_loss_backward(model, s))


def load_unsloth(folder, s: Settings) -> Run:
    """unsloth's FastLanguageModel with its own ("unsloth") gradient checkpointing. The caller must
    have imported unsloth before anything imported transformers."""
    if torch.device(s.device).type != "cuda":
        raise RuntimeError("unsloth needs a CUDA GPU")
    from unsloth import FastLanguageModel

    model, _tok = FastLanguageModel.from_pretrained(str(folder), max_seq_length=s.max_seq, dtype=s.dtype,
                                                    load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=s.rank, target_modules=list(TARGETS), lora_alpha=s.alpha, lora_dropout=0, bias="none",
        use_gradient_checkpointing="unsloth" if s.checkpointing else False, random_state=s.seed)
    FastLanguageModel.for_training(model)
    return _finish(model, s, _hf_loss_backward(model, s))


def import_stack(stack: str):
    """Import a stack's libraries ahead of `load`, so that load times do not include Python imports."""
    import minilora.checkpoint  # noqa: F401
    import minilora.train  # noqa: F401

    if stack.startswith("peft"):
        import peft  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401
    elif stack == "unsloth":
        import unsloth  # noqa: F401


def recomputes(stack: str, s: Settings) -> bool:
    """Whether `stack` recomputes its layers in backward under `s` (--offload always does)."""
    offload = MINILORA_MODES.get(stack, {}).get("offload", False)
    return (s.checkpointing or offload) and stack not in NO_RECOMPUTE


def load(stack: str, folder, s: Settings) -> Run:
    loaders = {"peft": load_peft, "peft-fast": load_peft, "unsloth": load_unsloth}
    s = dataclasses.replace(s, checkpointing=recomputes(stack, s))
    if stack in MINILORA_MODES:
        return load_minilora(folder, s, stack)
    if stack not in loaders:
        raise ValueError(f"unknown stack {stack!r}; choose from {', '.join(STACKS)}.")
    return loaders[stack](folder, s)


def flops_per_token(cfg, seq: int, checkpointing: float) -> float:
    """Matmul FLOPs one training token costs (LoRA's own r*(in+out) terms, ~0.5% at r=16, left out).

    frozen decoder linears: 2 (forward) + 2 (input gradient; no weight gradient) + 2 (recompute) per parameter
    lm_head:                2 (forward) + 2 (input gradient) per parameter
    causal attention:       2 * seq * d_attn per layer forward (QK^T and AV over seq/2 keys on average),
                            x (1 forward + 2 backward + 1 recompute)
    Without checkpointing drop the recompute terms (4x linears, 3x attention); `checkpointing` may be the
    fraction of layers recomputed (--keep-activations). Counting the recompute makes this "hardware FLOPs".
    """
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    d_q, d_kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    linear = L * (h * d_q + 2 * h * d_kv + d_q * h + 3 * h * i)
    attention = L * 2 * seq * d_q
    k_lin, k_att = 4 + 2 * float(checkpointing), 3 + float(checkpointing)
    return k_lin * linear + 4 * cfg.vocab_size * h + k_att * attention


def is_oom(e: BaseException) -> bool:
    """CUDA OOM as torch raises it, or as a library reports it (cuBLAS, bitsandbytes, triton)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "alloc_failed" in msg)
