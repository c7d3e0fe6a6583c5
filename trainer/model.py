"""Model presets: `transformers` LlamaForCausalLM shapes, sized to the tokenizer, and FLOP counts.

The model stays a stock Hugging Face model so an export loads with `from_pretrained` and serves
with vLLM or llama.cpp. Speed comes from around it (torch.compile, fused optimizer), not a rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    d_ffn: int  # SwiGLU hidden width


# Shapes follow GPT-2/3 widths and depths with LLaMA's SwiGLU (ffn ~ 8/3 d, rounded to 128).
# 124m and 350m are the shapes of the speed baselines in ../shared/GPU_NOTES.md (at vocab 32000).
PRESETS: dict[str, Shape] = {
    "tiny": Shape(n_layer=2, d_model=64, n_head=4, n_kv_head=4, d_ffn=192),  # tests: seconds on CPU
    "6m": Shape(n_layer=4, d_model=256, n_head=4, n_kv_head=4, d_ffn=768),  # make demo on CPU
    "25m": Shape(n_layer=8, d_model=512, n_head=8, n_kv_head=8, d_ffn=1408),
    "124m": Shape(n_layer=12, d_model=768, n_head=12, n_kv_head=12, d_ffn=2048),
    "350m": Shape(n_layer=24, d_model=1024, n_head=16, n_kv_head=16, d_ffn=2816),
    "760m": Shape(n_layer=24, d_model=1536, n_head=16, n_kv_head=16, d_ffn=4096),
    "1b": Shape(n_layer=24, d_model=2048, n_head=16, n_kv_head=8, d_ffn=5632),
}


def padded_vocab(n_tokens: int, multiple: int = 64) -> int:
    """Embedding rows: the tokenizer's size rounded up so matmuls tile evenly on tensor cores."""
    return -(-n_tokens // multiple) * multiple


def llama_config(preset: str, vocab_size: int, seq_len: int, tie_embeddings: bool = False,
                 bos_token_id: int | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None):
    from transformers import LlamaConfig

    s = PRESETS[preset]
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
# transformers' AttentionInterface / AttentionMaskInterface keeps the stock model and skips the mask.
CAUSAL_SDPA = "sdpa_causal"


def register_causal_sdpa() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
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
    AttentionMaskInterface.register(CAUSAL_SDPA, lambda *args, **kwargs: None)


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
    counts, the input embedding (a lookup) does not. Same definition as ../shared/GPU_NOTES.md.
    """
    p = n_params(shape, vocab_size, tie_embeddings)
    matmul_params = p["total"] - p["embedding"] + (p["embedding"] if tie_embeddings else 0)
    return 6.0 * matmul_params + 12.0 * shape.n_layer * shape.d_model * seq_len


# Dense bf16 peak FLOP/s used for MFU (vendor datasheets, SXM parts).
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l40s": 362e12, "4090": 165e12}


def peak_flops(device_name: str) -> float | None:
    name = device_name.lower()
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None
