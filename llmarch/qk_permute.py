"""llama.cpp's Q/K row order for llama-family GGUFs, both ways (numpy arrays and torch tensors).

convert_hf_to_gguf's permute() interleaves the two rotary halves of each head: rows that HF
orders as (head, 2, half) are written as (head, half, 2). No torch import: inspect/convert use it.
"""


def to_gguf_order(x, heads: int):
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def from_gguf_order(x, heads: int):
    return x.reshape(heads, x.shape[0] // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
