"""Seconds per study and peak memory on MedGemma 4B's exact architecture with random weights
(not a test): generate 64 tokens, then explain 3 targets (Chefer) of the answer.

    python benchmarks/bench_medgemma.py [--device cuda] [--dtype bfloat16] [--new 64] [--targets 3]
    python benchmarks/bench_medgemma.py --layers 2 --vision-layers 2   # a quick smoke run on a CPU

Architecture (google/medgemma-4b-it): Gemma 3 text model with 34 layers, hidden 2560, 8 query /
4 KV heads of dim 256, MLP 10240, vocabulary 262,208, sliding window 1024 on 5 of every 6
layers; SigLIP vision tower with 27 layers at 896 px (patch 14); 256 image tokens. Weights are
random (no download), so the answer is noise, but every tensor has MedGemma's shape and dtype.
Peak memory: torch.cuda.max_memory_allocated on CUDA, the process's peak resident set on a CPU.
"""
from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import Gemma3Config, Gemma3ForConditionalGeneration  # noqa: E402

from pipeline.model import resolve_device, resolve_dtype  # noqa: E402
from pipeline.relevancy import Target, explain_sequence  # noqa: E402

IMAGE_TOKEN, BOI, EOI, BOS = 262144, 255999, 256000, 2


def medgemma_config(layers: int = 34, vision_layers: int = 27) -> Gemma3Config:
    text = dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=layers,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
                layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
                query_pre_attn_scalar=256, max_position_embeddings=131072)
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=vision_layers, num_attention_heads=16,
                  image_size=896, patch_size=14, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, image_token_index=IMAGE_TOKEN,
                        boi_token_index=BOI, eoi_token_index=EOI)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB (Linux)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=34)
    ap.add_argument("--vision-layers", type=int, default=27)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--targets", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    args = ap.parse_args()
    device = torch.device(resolve_device(args.device))
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = Gemma3ForConditionalGeneration._from_config(medgemma_config(args.layers, args.vision_layers), dtype=dtype)
    model.eval().requires_grad_(False)
    build = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1000, 200000, (args.prompt_tokens,), generator=g)
    ids = torch.cat([torch.tensor([BOS, 105, 2364, 107, BOI]), torch.full((256,), IMAGE_TOKEN), torch.tensor([EOI]),
                     text, torch.tensor([106, 107, 105, 4368, 107])])[None].to(device)
    pixels = torch.randn(1, 3, 896, 896, generator=g).to(device=device, dtype=dtype)
    tt = (ids == IMAGE_TOKEN).long()
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             token_type_ids=tt, do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new)
    sync(device)
    t_gen = time.perf_counter() - t0
    seq = out[:1]
    n = seq.shape[1]
    targets = [Target(p, p + 1) for p in range(n - args.targets, n)]
    t0 = time.perf_counter()
    res = explain_sequence(model, seq, pixels, (seq == IMAGE_TOKEN).long(), targets, ["chefer"],
                           prompt_length=ids.shape[1], chunk_size=args.targets)
    sync(device)
    t_exp = time.perf_counter() - t0
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
          f"dtype {dtype}, {n_params / 1e9:.2f} B parameters, {args.layers} text / {args.vision_layers} vision layers")
    print(f"model built in {build:.1f} s; sequence {n} tokens ({ids.shape[1]} prompt incl. 256 image tokens, {args.new} new)")
    print(f"generate {args.new} tokens: {t_gen:.2f} s; explain {args.targets} targets (chefer): {t_exp:.2f} s "
          f"(forward {res.timings.get('forward', float('nan')):.2f} s, gradients {res.timings.get('gradients', float('nan')):.2f} s)")
    print(f"seconds per study: {t_gen + t_exp:.2f}; peak memory {peak_memory_gib(device):.2f} GiB; "
          f"argmax reproduces the answer: {res.argmax_matches}")


if __name__ == "__main__":
    main()
