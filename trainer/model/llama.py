"""The model: `transformers` LlamaForCausalLM of a shape (a preset, model.* overriding its numbers),
sized to the tokenizer, and its parameter, FLOP and memory counts.

The model stays a stock Hugging Face model so an export loads with `from_pretrained` and serves
with vLLM or llama.cpp. Speed comes from around it (torch.compile, fused optimizer), not a rewrite.
"""

from __future__ import annotations

# The shapes are configuration (config/check.py validates them), so they live in the config layer;
# this module is where the model side reads them.
from trainer.config.schema import PRESETS, Shape, model_shape, shape_overrides  # noqa: F401 (re-exported)


def padded_vocab(n_tokens: int, multiple: int = 64) -> int:
    """Embedding rows: the tokenizer's size rounded up so matmuls tile evenly on tensor cores."""
    return -(-n_tokens // multiple) * multiple


def llama_config(shape: Shape | str, vocab_size: int, seq_len: int, tie_embeddings: bool = False,
                 bos_token_id: int | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None):
    """The LlamaConfig of `shape` (a Shape, e.g. model_shape(cfg.model), or a preset's name) with
    context seq_len (max_position_embeddings) and the tokenizer's vocabulary, padded."""
    from transformers import LlamaConfig

    s = PRESETS[shape] if isinstance(shape, str) else shape
    return LlamaConfig(
        vocab_size=padded_vocab(vocab_size), hidden_size=s.d_model, intermediate_size=s.d_ffn,
        num_hidden_layers=s.n_layer, num_attention_heads=s.n_head, num_key_value_heads=s.n_kv_head,
        max_position_embeddings=seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tie_embeddings, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, use_cache=True,
    )


# Training attention for packed, unpadded sequences: SDPA with is_causal=True and no mask tensor.
# Under torch.compile, transformers (5.x with torch < 2.14) builds an explicit (B, 1, T, T) mask for
# plain "sdpa", which keeps SDPA off its flash/cuDNN kernels. Registering our own name through
# transformers' AttentionInterface, with no mask function, keeps the stock model and skips the mask.
CAUSAL_SDPA = "sdpa_causal"


def register_causal_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):  # query (B, H, Tq, D), key (B, Hkv, Tk, D)
        kwargs.pop("is_causal", None)
        q_len, kv_len = query.shape[2], key.shape[2]
        if q_len != kv_len and q_len != 1:
            raise NotImplementedError(f"{CAUSAL_SDPA}: {q_len} queries over {kv_len} cached keys needs a mask; "
                                      f"use attn_implementation='sdpa' for chunked prefill")
        # Training and prefill: causal. Decoding one token against the cache: it sees every key.
        return sdpa_attention_forward(module, query, key, value, None, is_causal=q_len > 1, **kwargs)

    AttentionInterface.register(CAUSAL_SDPA, attention)
    # No mask function: transformers then prepares no mask at all (no packed-sequence check, which
    # reads the position ids back to the host on every forward outside torch.compile).


def pick_attention(requested: str, device_type: str) -> str:
    """For training: flash_attention_2 when installed on a GPU, else causal SDPA without a mask."""
    if requested != "auto":
        return requested
    if device_type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return CAUSAL_SDPA


def build_model(config, attn_implementation: str = "sdpa"):
    """A freshly initialised LlamaForCausalLM in float32 (autocast supplies bf16 on GPU)."""
    from transformers import LlamaForCausalLM

    if attn_implementation == CAUSAL_SDPA:
        register_causal_sdpa()
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config)


def n_params(shape: Shape, vocab_size: int, tie_embeddings: bool = False) -> dict[str, int]:
    """Parameter counts by part, from the shape alone (checked against the real model in tests)."""
    d, f, L = shape.d_model, shape.d_ffn, shape.n_layer
    head_dim = d // shape.n_head
    attn = d * d * 2 + 2 * d * shape.n_kv_head * head_dim  # q, o; k, v
    mlp = 3 * d * f  # gate, up, down
    per_layer = attn + mlp + 2 * d  # two RMSNorm weights
    embed = vocab_size * d
    head = 0 if tie_embeddings else vocab_size * d
    total = embed + L * per_layer + d + head
    return {"embedding": embed, "lm_head": head, "layers": L * per_layer, "total": total}


def flops_per_token(shape: Shape, vocab_size: int, seq_len: int, tie_embeddings: bool = False) -> float:
    """Training FLOPs per token: 6 x (params - input embedding) + 12 x layers x d_model x seq_len.

    The first term is forward + backward of every matmul (Kaplan et al. 2020, arXiv 2001.08361);
    the second is attention scores and values (PaLM appendix B, arXiv 2204.02311). The lm_head
    counts, the input embedding (a lookup) does not.
    """
    p = n_params(shape, vocab_size, tie_embeddings)
    matmul_params = p["total"] - p["embedding"] + (p["embedding"] if tie_embeddings else 0)
    return 6.0 * matmul_params + 12.0 * shape.n_layer * shape.d_model * seq_len


# Dense bf16 peak FLOP/s used for MFU (vendor datasheets, SXM parts).
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l40s": 362e12, "4090": 165e12}
# Memory per GPU in GB as the vendor datasheets give it: H100 SXM5 80 GB HBM3, H200 141 GB HBM3e,
# A100 SXM4 80 GB HBM2e (the 80 GB part; the 40 GB A100 is not this row), L40S 48 GB GDDR6, GeForce
# RTX 4090 24 GB GDDR6X. The memory model reads them as 1e9 bytes, which is conservative: the
# datasheets' GB are nearer GiB (nvidia-smi shows 143,771 MiB = 150.8e9 bytes on our H200s, KINDS
# notes of the device machines), and ECC (on by default on L40S) takes a few percent of GDDR6.
GPU_MEMORY_GB = {"h100": 80.0, "h200": 141.0, "a100": 80.0, "l40s": 48.0, "4090": 24.0}

# Training memory -------------------------------------------------------------------------------
# Per parameter with AdamW under bf16 autocast: fp32 weights 4 + fp32 gradients 4 + two fp32 moments
# 8 = 16 bytes, the same total ZeRO counts for mixed-precision Adam (Rajbhandari et al. 2020, arXiv
# 1910.02054, sec. 3.1: 2 + 2 + 12). DDP keeps it whole on every GPU (its buckets are views of the
# gradients: gradient_as_bucket_view=True in trainer/training/loop.py); FSDP divides it by the ranks.
# Muon keeps one moment instead of two on the hidden matrices: 16 over-counts it by ~20%.
STATE_BYTES_PER_PARAM = 16
# Activations of one transformer layer: s b h (34 + 5 a s / h) bytes (Korthikanti et al. 2022,
# "Reducing Activation Recomputation in Large Transformer Models", arXiv 2205.05198, eq. 1, 16-bit
# activations, no parallelism). The 5 a s / h term is the stored attention-score matrix, which
# flash/SDPA attention (what we train with) never materialises, so it is 0 here. The 34 is counted
# for GPT's 4h MLP with dropout; LLaMA's SwiGLU at ~8/3 h without dropout lands close to it.
ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH = 34
# With activation checkpointing each layer keeps only its bf16 input (2 s b h, Korthikanti sec. 4.1)
# and one layer's full activations exist at a time in the backward.
CHECKPOINTED_BYTES_PER_TOKEN_PER_WIDTH = 2
# Logits of one micro-batch: bf16 from the lm_head (2) and fp32 for the cross-entropy (4), s b V.
LOGIT_BYTES_PER_TOKEN_PER_VOCAB = 2 + 4
# FSDP2 all-gathers a layer's bf16 weights before its forward/backward and prefetches the next one:
# ~2 decoder layers exist whole at once (trainer/parallel/fsdp.py; Zhao et al. 2023, "PyTorch FSDP", sec.
# 3.3 on prefetching), and the root unit (embedding, final norm, lm_head) stays gathered from the
# embedding's forward to the head's.
FSDP_GATHERED_LAYERS = 2
# What max_memory_allocated does not see but the card must hold: the CUDA context with cuBLAS/cuDNN
# workspaces (~0.5-1 GB on Hopper), NCCL buffers (~0.5-1 GB), and the caching allocator's reserved but
# unallocated blocks (fragmentation). An assumption, not a measurement; see memory_per_gpu.
FSDP_AUTO_PARAMS = 2_000_000_000  # train.strategy=auto shards models from this size (3b/7b presets; 1b stays DDP)
MEMORY_OVERHEAD_BYTES = 3e9


def training_memory(shape: Shape, vocab_size: int, seq_len: int, micro_batch_size: int, shards: int = 1,
                    activation_checkpointing: bool = False, tie_embeddings: bool = False) -> dict[str, float]:
    """Predicted peak bytes on one GPU while training, by part, and their "total".

    shards: the FSDP world size the training state is divided over (1 for DDP, which keeps it whole
    on every GPU). state = STATE_BYTES_PER_PARAM x params / shards; activations (one micro-batch of
    micro_batch_size sequences of seq_len tokens, s b) = n_layer x ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH
    x s b h (Korthikanti et al. 2022 eq. 1 without the attention-score term), or with activation
    checkpointing n_layer x 2 s b h + one layer's full 34 s b h; logits = 6 s b V; gathered (shards > 1)
    = bf16 weights of FSDP_GATHERED_LAYERS decoder layers and of the root unit; overhead =
    MEMORY_OVERHEAD_BYTES. Pure arithmetic on the constants above, whose sources they cite.

    Checked against measurements on H200s from 124m to 7b (bench/RESULTS.md; docs/running.md,
    "Planning a big model", lists them): it errs high by 6-24%.
    """
    p = n_params(shape, vocab_size, tie_embeddings)
    s_b = float(seq_len * micro_batch_size)  # tokens in one micro-batch
    h, n = shape.d_model, shape.n_layer
    full_layer = ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH * s_b * h
    if activation_checkpointing:
        activations = n * CHECKPOINTED_BYTES_PER_TOKEN_PER_WIDTH * s_b * h + full_layer
    else:
        activations = n * full_layer
    gathered = 0.0
    if shards > 1:
        per_layer = p["layers"] / n
        root = p["total"] - p["layers"]  # embedding, final norm, lm_head
        gathered = 2.0 * (FSDP_GATHERED_LAYERS * per_layer + root)
    parts = {
        "state": STATE_BYTES_PER_PARAM * p["total"] / shards,
        "activations": activations,
        "logits": LOGIT_BYTES_PER_TOKEN_PER_VOCAB * s_b * vocab_size,
        "gathered_params": gathered,
        "overhead": MEMORY_OVERHEAD_BYTES,
    }
    parts["total"] = sum(parts.values())
    return parts


def peak_flops(device_name: str) -> float | None:
    name = device_name.lower()
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None
