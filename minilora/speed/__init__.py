"""The speed machinery: what makes training fast or lean, attached from outside to an unchanged model.

`configure(cfg, device)` makes every automatic choice from the flags and the device before anything loads,
refusing a combination that cannot work with the reason; `.attach(model)` then applies the choices:

    feature            file                what it changes                          when
    recompute          recompute.py        DecoderModel.call_layer                  --gradient-checkpointing (default)
    keep activations   recompute.py        the last N layers skip the recompute     --keep-activations N
    host offload       offload.py          call_layer, and the embedding table      --offload
    Triton dequantize  nf4_triton.py       nf4.faster_dequantize                    a CUDA GPU with Triton
    folded gate/up     mlp.py              each layer's MLP, swapped (same names)   training, unless --fsdp
    long-sequence MLP  mlp.py              the same swap                            past 32k tokens, unless --fsdp
    compile            compile.py          each decoder layer, the loss's chunks    --compile auto: long runs on CUDA
    CUDA graphs        graphs.py           the micro-step, recorded and replayed    --cuda-graphs auto: see `graphs`
    padding-free       padding_free.py     the batches: rows without pad tokens     --padding-free auto: with graphs
    flat optimizer     flat_optimizer.py   what AdamW steps: one tensor             always

CLASHES, below, is the one table of features that cannot run together. Nothing in model.py, nf4.py, lora.py or
loss.py imports this package: a learner reads the plain model, and the trainer attaches this to it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..checkpoint import default_dtype
from ..config import UsageError
from ..data import collate
from ..loss import LOGIT_ELEMENTS, causal_lm_loss
from . import nf4_triton, padding_free as pf
from .compile import compile_layers, compiled_chunk
from .flat_optimizer import flatten_for_optimizer
from .graphs import GraphedMicroBatches, GraphRecordingError, bucket_length  # noqa: F401  (the trainer's)
from .mlp import TrainingMLP
from .offload import HostEmbedding, Offload, host_embedding
from .recompute import Recompute, check_keep_activations, draws_random_numbers, kept_layers

# Features that cannot run together, and why. A flag asking for both is refused (`check`); where one of the two
# is automatic, it is left off.
CLASHES = {
    ("cuda_graphs", "fsdp"): "FSDP2's gathers run between the layers' kernels.",
    ("cuda_graphs", "dropout"): "the checkpointed recompute must save the RNG state to redraw the same masks, and a "
                                "recording cannot read it (without checkpointing, dropout in a graph is untested here).",
    ("compile", "fsdp"): "per-layer compile cannot trace FSDP2's gather/free hooks inside each layer here",
    # each call of a sharded layer gathers its weights, so every rank must make the same calls:
    ("mlp_pieces", "fsdp"): "the number of pieces depends on this rank's sequence length",
    ("fold", "fsdp"): "the folded gate/up reads the 4-bit codes without calling the layers, so without their gathers",
}

# Above this many tokens per micro-batch a step is GPU time already, while each recording keeps the memory of its
# activations in the graphs' pool (bench/NOTES.md, sections 9 and 10): auto leaves graphs off.
GRAPH_AUTO_TOKENS = 32768
# Compiled, a loss chunk holds no fp32 copy of its logits (loss.py), so its chunks can be twice as long.
COMPILED_LOGIT_ELEMENTS = 2 * LOGIT_ELEMENTS
# --compile auto compiles a run whose parameters x tokens (per process) reach this, and leaves a smaller one eager.
# Compiling costs ~13 s on a fresh machine (the compiler's first use, one layer graph, the loss's chunks), whatever
# the model, and saves a share of every step after it (1/3 at 1.5B, 1/4 at 8B). Measured break-evens (bench/NOTES.md,
# section 16): ~900k tokens for the 1.5B model (1.6e15), ~360k for the 8B (2.9e15); this is ~1.1M and ~250k.
COMPILE_AUTO_PARAM_TOKENS = 2e15

def _asked(cfg) -> dict[str, bool]:
    """The features a user turns on with a flag, of those CLASHES names."""
    return {"fsdp": cfg.fsdp, "dropout": cfg.dropout > 0}


def check(cfg) -> None:
    """Refuse, before anything loads, flags that ask for features that cannot work together (config.py calls
    this with the other checks of the flags)."""
    if cfg.keep_activations and not (cfg.gradient_checkpointing or cfg.offload):
        raise UsageError("--keep-activations N spares N layers the recompute of gradient checkpointing, which is off "
                         "(--no-gradient-checkpointing keeps every layer's activations already); drop one of the two.")
    asked = _asked(cfg)
    for other in ("fsdp", "dropout"):
        if cfg.cuda_graphs == "on" and asked[other]:
            raise UsageError(f"--cuda-graphs on cannot record --{other.replace('_', '-')}: "
                             f"{CLASHES['cuda_graphs', other]} Drop one of the two (--cuda-graphs auto does).")
    if cfg.fsdp and cfg.compile == "on":
        raise UsageError(f"--fsdp and --compile on: {CLASHES['compile', 'fsdp']}; use --compile off (or auto, which "
                         "is off under --fsdp).")


def make_batch(examples, pad_id: int, device, padding_free: bool = False, pad_to=None, host_embedding=None) -> dict:
    """One micro-batch on `device`: padded to its longest example (or to `pad_to(longest)`), or end to end in
    one row (padding_free.py; padded to `pad_to(its length)`, attention by flash's variable-length kernel where
    the device has it). With the embedding table on the host (offload.py), its rows are looked up here, while
    the ids are still on the host, and sent as `inputs_embeds`."""
    b = (pf.collate(examples, pad_id, pad_to, flash=pf.flash_available(device)) if padding_free
         else collate(examples, pad_id, pad_to))
    if host_embedding is not None:
        b["inputs_embeds"] = host_embedding(b["input_ids"])
    # non_blocking: queued behind the GPU's work instead of waiting for it (the trainer makes the next step's
    # batches while this step runs); from pageable memory the copy takes the host's bytes before it returns
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}


@dataclass
class Speed:
    """The choices `configure` made, and what the training loop asks of them."""
    device: torch.device
    recompute: bool  # gradient checkpointing (and always with offload)
    keep_activations: int
    offload: bool
    padding_free: bool
    row_tokens: int  # padding-free: a row holds at most batch_size x max_seq_len tokens, a padded batch's most
    deal: bool  # padding-free: deal a step's examples into rows anew (not under --fsdp: padding_free.py)
    swap_mlp: bool  # the folded gate/up and the long-sequence pieces (mlp.py)
    triton: bool
    compile: bool
    graphs: bool
    row_plan: list[int] = field(default_factory=list)  # padding-free under graphs: the run's row lengths (plan_rows)
    loss: Callable = causal_lm_loss  # what the micro-step and the eval call: with compiled chunks once attached
    host_embedding: HostEmbedding | None = None

    def attach(self, model) -> list[torch.nn.Parameter]:
        """Apply the choices to a model that has its LoRA already; returns what the optimizer steps."""
        check_keep_activations(self.keep_activations, len(model.model.layers), "the model")
        keep, rng = kept_layers(model, self.keep_activations), draws_random_numbers(model)
        if self.offload:
            model.model.call_layer = Offload(self.device, keep, rng)
            if not model.config.tie_word_embeddings:  # a tied table is also lm_head, which the GPU needs
                model.model.embed_tokens = HostEmbedding(model.model.embed_tokens.weight, self.device)
        elif self.recompute:
            model.model.call_layer = Recompute(keep, rng)
        self.host_embedding = host_embedding(model)
        if self.triton:
            nf4_triton.install()
        if self.swap_mlp:
            for layer in model.model.layers:
                layer.mlp = TrainingMLP(layer.mlp, fold=True, in_pieces=True)
        if self.compile:  # each decoder layer, one graph for every length; the loss's chunks (compile.py)
            compile_layers(model)
            self.loss = functools.partial(causal_lm_loss, chunk=compiled_chunk(),
                                          logit_elements=COMPILED_LOGIT_ELEMENTS)
        model.train()
        return flatten_for_optimizer([p for p in model.parameters() if p.requires_grad])

    def fit_to_run(self, cfg, run_tokens: int, n_params: int) -> str | None:
        """The choice that waits for the run's length and the model: under --compile auto, a run whose
        n_params x run_tokens is below COMPILE_AUTO_PARAM_TOKENS is not compiled. Returns the line that tells the user
        so, or None."""
        pays_from = round(COMPILE_AUTO_PARAM_TOKENS / n_params)  # tokens
        if cfg.compile != "auto" or not self.compile or run_tokens >= pays_from:
            return None
        self.compile = False
        return (f"compile: off for this run ({run_tokens:,} tokens to train; for this model compiling pays from about "
                f"{pays_from:,}); --compile on compiles anyway")

    def plan_rows(self, step_examples: Callable[[int], list], steps: int, longest: int) -> None:
        """Padding-free under CUDA graphs: choose the few row lengths of the run (padding_free.plan_lengths) from
        `step_examples(i)`, the examples of its i-th step, for up to PLAN_STEPS of its `steps`; `longest`: the
        longest example. Without this plan a step may take any of row_lengths'."""
        if self.padding_free and self.deal and self.graphs:
            sample = [step_examples(i) for i in range(0, steps, -(-steps // pf.PLAN_STEPS))]
            self.row_plan = pf.plan_lengths(sample, self.row_tokens, longest, steps)

    def make_batches(self, micro_batches: list[list], pad_id: int) -> list[dict]:
        """A step's micro-batches on the device; padding-free, its examples dealt into full rows, under CUDA graphs
        into rows of the run's few lengths (padding_free.py)."""
        if not (self.padding_free and self.deal):
            return [self.make_batch(mb, pad_id) for mb in micro_batches]
        examples = [e for mb in micro_batches for e in mb]
        if not self.graphs:
            return [self.make_batch(row, pad_id) for row in pf.deal(examples, self.row_tokens)]
        lengths = self.row_plan or pf.row_lengths(self.row_tokens)
        return [make_batch(row, pad_id, self.device, True, lambda n, length=length: length, self.host_embedding)
                for row, length in pf.deal_to_lengths(examples, lengths)]

    def make_batch(self, examples, pad_id: int, training: bool = True) -> dict:
        """A micro-batch as these choices want it: padded or padding-free; under CUDA graphs (training only) padded
        to few lengths; with its embedding rows looked up on the host in lean mode."""
        pad_to = None
        if self.graphs and training:
            pad_to = functools.partial(pf.row_length, capacity=self.row_tokens) if self.padding_free else bucket_length
        return make_batch(examples, pad_id, self.device, self.padding_free, pad_to, self.host_embedding)

    def record(self, step, params: list[torch.Tensor], scaler=None):
        """`step(batch, inv_n)` replayed from CUDA graphs (graphs.py), its loss taken over every position (no
        wait for the host). Without graphs, `step` itself."""
        if not self.graphs:
            return step
        if scaler is not None and scaler.is_enabled():
            raise ValueError("CUDA graphs record the step without fp16 loss scaling; train in bf16 or without graphs.")
        return GraphedMicroBatches(functools.partial(step, loss=functools.partial(self.loss, every_position=True)),
                                   params, offload=self.offload)


def configure(cfg, device, world: int = 1) -> Speed:
    """Every automatic choice, from the flags (a TrainConfig, or anything with its fields) and the device."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    asked, recorded, flash = _asked(cfg), graphs(cfg, device, world), pf.flash_available(device)
    padding_free = cfg.padding_free == "on" or (cfg.padding_free == "auto" and recorded and flash)
    if padding_free and recorded and not flash:  # SDPA one example at a time reads the bounds on the host
        if cfg.cuda_graphs == "on":
            raise UsageError("--padding-free on under --cuda-graphs on needs flash attention's variable-length "
                             f"kernel, which {torch.cuda.get_device_name(device)} lacks (compute capability 8.0 or "
                             "more); drop one of the two.")
        recorded = False
    return Speed(device=device, recompute=cfg.gradient_checkpointing or cfg.offload,
                 keep_activations=cfg.keep_activations, offload=cfg.offload, padding_free=padding_free,
                 row_tokens=cfg.batch_size * cfg.max_seq_len, deal=not asked["fsdp"],
                 swap_mlp=not asked["fsdp"], triton=cuda and nf4_triton.triton is not None,
                 compile=not asked["fsdp"] and (cfg.compile == "on" or (cfg.compile == "auto" and cuda)),
                 graphs=recorded)


def graphs(cfg, device: torch.device, world: int) -> bool:
    """--cuda-graphs: `on` asks for them (check() refused the flags they cannot record), `auto` takes them where
    they work and pay: a CUDA GPU with bf16, none of CLASHES' flags, one process (the recording with the ranks'
    all-reduce is not yet measured), and at most GRAPH_AUTO_TOKENS tokens per micro-batch."""
    dtype = default_dtype(device)
    fits = device.type == "cuda" and dtype == torch.bfloat16
    if cfg.cuda_graphs == "on" and not fits:
        raise UsageError(f"--cuda-graphs on needs a CUDA GPU with bf16 (this run trains on {device} in {dtype}); "
                         "use --cuda-graphs off.")
    return cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and fits and not any(_asked(cfg).values())
                                       and world == 1 and cfg.max_seq_len * cfg.batch_size <= GRAPH_AUTO_TOKENS)
