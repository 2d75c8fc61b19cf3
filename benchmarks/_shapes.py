"""Parameter shapes of well-known models, built by hand, for layout benchmarks.

Every function returns the shapes in the order `model.parameters()` lists them for the reference
implementation named in its docstring (biases and norm weights included, tied weights listed once).
Nothing here imports torch, transformers or torchvision: the shapes are written out so that the
benchmarks run anywhere. `KNOWN_NUMEL` holds the published parameter counts and `check_totals()`
asserts that the hand-built lists add up to them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

Shape = tuple[int, ...]


def numel_of(shape: Shape) -> int:
    """Return the elements of a tensor of `shape` (1 for a 0-d shape)."""
    return math.prod(shape)


def _gpt2(*, num_layers: int, hidden: int, vocab: int = 50257, context: int = 1024) -> list[Shape]:
    # NOTE: Hugging Face GPT2Model uses Conv1D, whose weight is (in_features, out_features).
    shapes: list[Shape] = [(vocab, hidden), (context, hidden)]
    for _ in range(num_layers):
        shapes += [
            (hidden,),  # ln_1.weight
            (hidden,),  # ln_1.bias
            (hidden, 3 * hidden),  # attn.c_attn.weight
            (3 * hidden,),  # attn.c_attn.bias
            (hidden, hidden),  # attn.c_proj.weight
            (hidden,),  # attn.c_proj.bias
            (hidden,),  # ln_2.weight
            (hidden,),  # ln_2.bias
            (hidden, 4 * hidden),  # mlp.c_fc.weight
            (4 * hidden,),  # mlp.c_fc.bias
            (4 * hidden, hidden),  # mlp.c_proj.weight
            (hidden,),  # mlp.c_proj.bias
        ]
    shapes += [(hidden,), (hidden,)]  # ln_f.weight, ln_f.bias
    return shapes


def gpt2_small() -> list[Shape]:
    """Return GPT-2 small (124M) shapes as Hugging Face GPT2LMHeadModel lists them.

    wte 50257x768, wpe 1024x768, 12 blocks of width 768; lm_head is tied to wte and not repeated.
    """
    return _gpt2(num_layers=12, hidden=768)


def gpt2_medium() -> list[Shape]:
    """Return GPT-2 medium (355M) shapes: 24 blocks of width 1024, lm_head tied to wte."""
    return _gpt2(num_layers=24, hidden=1024)


def bert_base() -> list[Shape]:
    """Return BERT-base-uncased (110M) shapes as Hugging Face BertModel lists them, pooler included.

    Vocabulary 30522, 512 positions, 2 token types, 12 layers of width 768 and FFN 3072.
    nn.Linear weights are (out_features, in_features).
    """
    hidden, ffn = 768, 3072
    shapes: list[Shape] = [
        (30522, hidden),  # embeddings.word_embeddings.weight
        (512, hidden),  # embeddings.position_embeddings.weight
        (2, hidden),  # embeddings.token_type_embeddings.weight
        (hidden,),  # embeddings.LayerNorm.weight
        (hidden,),  # embeddings.LayerNorm.bias
    ]
    for _ in range(12):
        for _qkv in range(3):  # attention.self.{query,key,value}
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [
            (hidden, hidden),  # attention.output.dense.weight
            (hidden,),  # attention.output.dense.bias
            (hidden,),  # attention.output.LayerNorm.weight
            (hidden,),  # attention.output.LayerNorm.bias
            (ffn, hidden),  # intermediate.dense.weight
            (ffn,),  # intermediate.dense.bias
            (hidden, ffn),  # output.dense.weight
            (hidden,),  # output.dense.bias
            (hidden,),  # output.LayerNorm.weight
            (hidden,),  # output.LayerNorm.bias
        ]
    shapes += [(hidden, hidden), (hidden,)]  # pooler.dense.weight, pooler.dense.bias
    return shapes


def llama_1b() -> list[Shape]:
    """Return Llama-3.2-1B shapes as Hugging Face LlamaForCausalLM lists them.

    Vocabulary 128256, hidden 2048, 16 layers, 32 query heads and 8 key/value heads of dimension 64
    (k_proj and v_proj are 512x2048), SwiGLU intermediate 8192, RMSNorm weights without bias.
    The embedding is tied to lm_head (`tie_word_embeddings=True`, as released), so lm_head is not
    repeated. Within a layer, attention and MLP come before the two norms because LlamaDecoderLayer
    registers them first.
    """
    vocab, hidden, kv, inter = 128256, 2048, 512, 8192
    shapes: list[Shape] = [(vocab, hidden)]  # model.embed_tokens.weight
    for _ in range(16):
        shapes += [
            (hidden, hidden),  # self_attn.q_proj.weight
            (kv, hidden),  # self_attn.k_proj.weight
            (kv, hidden),  # self_attn.v_proj.weight
            (hidden, hidden),  # self_attn.o_proj.weight
            (inter, hidden),  # mlp.gate_proj.weight
            (inter, hidden),  # mlp.up_proj.weight
            (hidden, inter),  # mlp.down_proj.weight
            (hidden,),  # input_layernorm.weight
            (hidden,),  # post_attention_layernorm.weight
        ]
    shapes.append((hidden,))  # model.norm.weight
    return shapes


def llama_8b() -> list[Shape]:
    """Return Llama-3.1-8B shapes as Hugging Face LlamaForCausalLM lists them.

    Vocabulary 128256, hidden 4096, 32 layers, 32 query heads and 8 key/value heads of dimension
    128 (k_proj and v_proj are 1024x4096), SwiGLU intermediate 14336, RMSNorm weights without bias.
    The embedding is not tied (`tie_word_embeddings=False`), so lm_head comes last, after the
    final norm.
    """
    vocab, hidden, kv, inter = 128256, 4096, 1024, 14336
    shapes: list[Shape] = [(vocab, hidden)]  # model.embed_tokens.weight
    for _ in range(32):
        shapes += [
            (hidden, hidden),  # self_attn.q_proj.weight
            (kv, hidden),  # self_attn.k_proj.weight
            (kv, hidden),  # self_attn.v_proj.weight
            (hidden, hidden),  # self_attn.o_proj.weight
            (inter, hidden),  # mlp.gate_proj.weight
            (inter, hidden),  # mlp.up_proj.weight
            (hidden, inter),  # mlp.down_proj.weight
            (hidden,),  # input_layernorm.weight
            (hidden,),  # post_attention_layernorm.weight
        ]
    shapes.append((hidden,))  # model.norm.weight
    shapes.append((vocab, hidden))  # lm_head.weight
    return shapes


def resnet50() -> list[Shape]:
    """Return ResNet-50 shapes as torchvision.models.resnet50 lists them.

    Conv weights are 4-D (out, in, kh, kw) without bias; every BatchNorm contributes weight and bias
    (running statistics are buffers, not parameters); fc is 1000x2048 plus bias.
    """
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    in_planes = 64
    for width, num_blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out_planes = 4 * width
        for block in range(num_blocks):
            shapes += [
                (width, in_planes, 1, 1),
                (width,),
                (width,),
                (width, width, 3, 3),
                (width,),
                (width,),
                (out_planes, width, 1, 1),
                (out_planes,),
                (out_planes,),
            ]
            if block == 0:  # downsample: 1x1 conv + BatchNorm
                shapes += [(out_planes, in_planes, 1, 1), (out_planes,), (out_planes,)]
            in_planes = out_planes
    shapes += [(1000, 2048), (1000,)]  # fc.weight, fc.bias
    return shapes


MODELS: dict[str, Callable[[], list[Shape]]] = {
    "gpt2-small": gpt2_small,
    "gpt2-medium": gpt2_medium,
    "bert-base": bert_base,
    "llama-3.2-1b": llama_1b,
    "llama-3.1-8b": llama_8b,
    "resnet50": resnet50,
}
"""Model name -> function returning its parameter shapes, in the order the benchmarks print them."""

KNOWN_NUMEL: dict[str, int] = {
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "bert-base": 109_482_240,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "resnet50": 25_557_032,
}
"""Published parameter counts (Hugging Face / torchvision), tied weights counted once."""


def check_totals() -> dict[str, int]:
    """Return model name -> summed elements, raising ValueError where a total is not the published one."""
    name_to_numel = {name: sum(numel_of(s) for s in fn()) for name, fn in MODELS.items()}
    wrong = {name: (n, KNOWN_NUMEL[name]) for name, n in name_to_numel.items() if n != KNOWN_NUMEL[name]}
    if wrong:
        raise ValueError(f"hand-built shapes do not add up to the published counts (got, expected): {wrong}")
    return name_to_numel


if __name__ == "__main__":
    for name, total in check_totals().items():
        print(f"{name:14s} {len(MODELS[name]()):4d} tensors {total:>14,d} elements (matches published)")
