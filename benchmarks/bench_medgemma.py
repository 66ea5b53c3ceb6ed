"""Seconds per study and peak memory on MedGemma 4B's exact architecture with random weights
(not a test): generate 64 tokens for a batch of studies, then explain 3 targets (Chefer) of
each study's answer.

    python benchmarks/bench_medgemma.py [--device cuda] [--dtype bfloat16] [--batch 1,16]
                                        [--attn eager,vision_sdpa] [--profile] [--json out.json]
    python benchmarks/bench_medgemma.py --layers 2 --vision-layers 2 --image-size 224   # CPU smoke run

Architecture (google/medgemma-4b-it): Gemma 3 text model with 34 layers, hidden 2560, 8 query /
4 KV heads of dim 256, MLP 10240, vocabulary 262,208, sliding window 1024 on 5 of every 6
layers; SigLIP vision tower with 27 layers at 896 px (patch 14); 256 image tokens. Weights are
random (no download), so the answer is noise, but every tensor has MedGemma's shape and dtype.

A study is one image and one prompt. At batch B, B studies (different images, prompts of equal
length, so no padding) are generated together, then each study's 3 last answer tokens are
explained with one engine call (one captured forward, batched vector-Jacobian products).
Seconds per study = (generation of the batch + the B engine calls) / B. Every configuration is
run once untimed first (CUDA kernels, allocator). Attention implementations (``--attn``):
``eager`` everywhere (what ``pipeline.model.load_model`` used to load), ``sdpa`` everywhere, or
``vision_sdpa`` (SigLIP on sdpa, the language model eager: the pipeline's default; the engine
switches the language model to its capture implementation while explaining in every case).
Peak memory: torch.cuda.max_memory_allocated on CUDA (reset per configuration), the process's
peak resident set on a CPU (never reset).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import Gemma3Config, Gemma3ForConditionalGeneration  # noqa: E402

from pipeline.model import ATTN_IMPLEMENTATIONS, attn_implementation_arg, resolve_device, resolve_dtype  # noqa: E402
from pipeline.relevancy import Target, explain_sequence  # noqa: E402

VOCAB = 262208
IMAGE_TOKEN, BOI, EOI, BOS = 262144, 255999, 256000, 2  # MedGemma's ids; see special_ids for --vocab


def special_ids(vocab: int) -> tuple[int, int, int, int]:
    """(image, begin-of-image, end-of-image, bos) ids: MedGemma's, or the last ids of a smaller
    vocabulary (smoke runs: the 262k-row LM head dominates a tiny model on a CPU)."""
    return (IMAGE_TOKEN, BOI, EOI, BOS) if vocab == VOCAB else (vocab - 1, vocab - 3, vocab - 2, BOS)


def medgemma_config(layers: int = 34, vision_layers: int = 27, image_size: int = 896, vocab: int = VOCAB) -> Gemma3Config:
    image, boi, eoi, _ = special_ids(vocab)
    text = dict(vocab_size=vocab, hidden_size=2560, intermediate_size=10240, num_hidden_layers=layers,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
                layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
                query_pre_attn_scalar=256, max_position_embeddings=131072)
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=vision_layers, num_attention_heads=16,
                  image_size=image_size, patch_size=14, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, image_token_index=image,
                        boi_token_index=boi, eoi_token_index=eoi)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB (Linux)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_studies(batch: int, prompt_tokens: int, image_size: int, device: torch.device, dtype: torch.dtype,
                 vocab: int = VOCAB, seed: int = 0):
    """(input_ids (B, P), pixel_values (B, 3, S, S)): chat-formatted prompts with 256 image tokens."""
    image, boi, eoi, bos = special_ids(vocab)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        text = torch.randint(1000, min(200000, vocab - 10), (prompt_tokens,), generator=g)
        rows.append(torch.cat([torch.tensor([bos, 105, 2364, 107, boi]), torch.full((256,), image),
                               torch.tensor([eoi]), text, torch.tensor([106, 107, 105, 4368, 107])]))
    ids = torch.stack(rows).to(device)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g).to(device=device, dtype=dtype)
    return ids, pixels


def generate(model, ids, pixels, new: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                              token_type_ids=(ids == model.config.image_token_id).long(), do_sample=False,
                              max_new_tokens=new, min_new_tokens=new)


def explain(model, seq: torch.Tensor, pixels: torch.Tensor, prompt_length: int, n_targets: int):
    """One engine call on one study (seq (1, N), pixels (1, 3, S, S)): its last n_targets tokens."""
    n = seq.shape[1]
    targets = [Target(p, p + 1) for p in range(n - n_targets, n)]
    return explain_sequence(model, seq, pixels, (seq == model.config.image_token_id).long(), targets, ["chefer"],
                            prompt_length=prompt_length, chunk_size=n_targets)


def run_config(model, device, dtype, args, batch: int) -> dict:
    """Time generation of `batch` studies and their explanation; one untimed run first."""
    ids, pixels = make_studies(batch, args.prompt_tokens, args.image_size, device, dtype, args.vocab)
    warm = generate(model, ids, pixels, 2)
    explain(model, warm[:1], pixels[:1], ids.shape[1], min(args.targets, 2))
    del warm
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = generate(model, ids, pixels, args.new)
    sync(device)
    t_gen = time.perf_counter() - t0
    t_exp, fwd, grads, matches = 0.0, 0.0, 0.0, 0
    for b in range(batch):
        t0 = time.perf_counter()
        res = explain(model, out[b : b + 1], pixels[b : b + 1], ids.shape[1], args.targets)
        sync(device)
        t_exp += time.perf_counter() - t0
        fwd += res.timings.get("forward", 0.0)
        grads += res.timings.get("gradients", 0.0)
        matches += bool(res.argmax_matches)
    return {
        "batch": batch, "sequence_tokens": int(out.shape[1]), "prompt_tokens": int(ids.shape[1]),
        "generate_s": t_gen, "explain_s": t_exp, "explain_forward_s": fwd, "explain_gradients_s": grads,
        "seconds_per_study": (t_gen + t_exp) / batch, "generate_s_per_study": t_gen / batch,
        "explain_s_per_study": t_exp / batch, "peak_gib": peak_memory_gib(device),
        "argmax_reproduced": f"{matches}/{batch}",
    }


def device_busy_seconds(events) -> float:
    """Seconds the device ran kernels: the self time of the profiler's device events (kernels,
    copies), as torch.profiler's own table totals it (operator rows would count them twice)."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e6


def profile(model, device, dtype, args, batch: int, top: int = 15) -> None:
    """torch.profiler over one generation of `batch` studies and one engine call: operators by
    self device time, and the device's busy time against the wall time (launch-bound or not)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    ids, pixels = make_studies(batch, args.prompt_tokens, args.image_size, device, dtype, args.vocab)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = generate(model, ids, pixels, args.new)
    phases = [("generate", lambda: generate(model, ids, pixels, args.new)),
              ("explain", lambda: explain(model, out[:1], pixels[:1], ids.shape[1], args.targets))]
    for name, fn in phases:
        sync(device)
        t0 = time.perf_counter()
        with torch_profile(activities=acts) as prof:
            fn()
            sync(device)
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        busy = device_busy_seconds(events)
        print(f"\nprofile {name} (batch {batch if name == 'generate' else 1}): wall {wall:.3f} s under the profiler, "
              f"device busy {busy:.3f} s ({busy / wall:.0%} of the profiled wall), {sum(e.count for e in events)} operator calls")
        print(events.table(sort_by=key, row_limit=top))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=34)
    ap.add_argument("--vision-layers", type=int, default=27)
    ap.add_argument("--image-size", type=int, default=896, help="SigLIP input side in px (MedGemma: 896)")
    ap.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size (MedGemma: 262208; smaller for smoke runs)")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--targets", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--batch", default="1,16", help="comma-separated generation batch sizes")
    ap.add_argument("--attn", default="vision_sdpa", help=f"comma-separated, from {', '.join(ATTN_IMPLEMENTATIONS)}")
    ap.add_argument("--profile", action="store_true", help="also profile the largest batch with torch.profiler")
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    attns = args.attn.split(",")
    for a in attns:
        attn_implementation_arg(a)  # validates
    device = torch.device(resolve_device(args.device))
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = Gemma3ForConditionalGeneration._from_config(
            medgemma_config(args.layers, args.vision_layers, args.image_size, args.vocab), dtype=dtype)
    model.eval().requires_grad_(False)
    build = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), dtype {dtype}, torch {torch.__version__}, {n_params / 1e9:.2f} B parameters, "
          f"{args.layers} text / {args.vision_layers} vision layers, {args.image_size} px; built in {build:.1f} s",
          flush=True)
    results = []
    for attn in attns:
        model.set_attn_implementation(attn_implementation_arg(attn))
        for batch in batches:
            try:
                r = run_config(model, device, dtype, args, batch)
            except torch.cuda.OutOfMemoryError as exc:
                r = {"batch": batch, "error": f"OutOfMemoryError: {str(exc).splitlines()[0]}"}
                torch.cuda.empty_cache()
            r["attn"] = attn
            results.append(r)
            if "error" in r:
                print(f"attn {attn:12s} batch {batch:3d}: {r['error']}", flush=True)
                continue
            print(f"attn {attn:12s} batch {batch:3d}: generate {args.new} tokens {r['generate_s']:.2f} s "
                  f"({r['generate_s_per_study']:.3f} s/study); explain {args.targets} targets {r['explain_s_per_study']:.3f} s/study "
                  f"(forward {r['explain_forward_s'] / batch:.3f}, gradients {r['explain_gradients_s'] / batch:.3f}); "
                  f"seconds per study {r['seconds_per_study']:.3f}; peak {r['peak_gib']:.2f} GiB; "
                  f"sequence {r['sequence_tokens']} tokens; argmax reproduced {r['argmax_reproduced']}", flush=True)
    if args.profile:
        model.set_attn_implementation(attn_implementation_arg(attns[-1]))
        profile(model, device, dtype, args, max(batches))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "dtype": str(dtype),
                                         "parameters": n_params, "build_s": build, "results": results}, indent=2))


if __name__ == "__main__":
    main()
