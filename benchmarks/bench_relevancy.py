"""Benchmark of the relevancy engine against the plain per-target reference.

Builds a mid-size random Gemma 3 vision-language model (default: 8 text layers with a 5:1
sliding/global pattern, 256 image tokens, a 40-token answer) and explains 8 targets of one
sequence (6 single answer tokens and 2 multi-token spans) with

- the engine (``pipeline.relevancy.explain_sequence``): one forward, batched VJPs, row-only
  propagation, no parameter gradients;
- the plain reference (``tests/reference_chefer.py::reference_chefer``): eager forward with
  ``output_attentions``, one backward per target with parameter gradients, full N x N ``R``;
- the other gradient methods of the registry on the same targets: ``legrad`` (from the same
  attention gradients as Chefer: alone, and together with Chefer, sharing the VJPs),
  ``gradcam``, ``integrated_gradients`` (``--ig-steps`` midpoint steps, ``--ig-batch``
  variants per pass: steps x targets forward and backward passes of its own) and ``attnlrp``
  (one forward with the LRP rules, one backward per target);

and also times one plain no-grad forward pass (the model's default attention implementation, as
used for generation).

Memory. On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call
(tensors only, the caching allocator's slack excluded). On CPU: the process's peak resident set
size during the call minus the resident size just before it, read from ``/proc/self/status``
(VmHWM) after resetting the high-water mark through ``/proc/self/clear_refs`` and returning freed
heap pages with ``malloc_trim``. These runs happen in a child process started with
``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns large freed blocks to the system at once
and the resident set follows the live tensors (that setting slows allocation, hence a separate
process from the timings). It still includes allocator and library overheads: an approximation.
Without procfs, memory is reported as n/a. Times are wall-clock medians over ``--repeats`` runs
after one warm-up, with device synchronisation.

Usage: ``python benchmarks/bench_relevancy.py [--device cuda --dtype bfloat16 --layers 34 ...]``
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from transformers import (  # noqa: E402
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

from pipeline.relevancy import METHODS, Target, explain_sequence  # noqa: E402

BOI, EOI, IMAGE = 4, 5, 6  # special ids of the benchmark vocabulary


def build_model(args: argparse.Namespace) -> Gemma3ForConditionalGeneration:
    """Random Gemma 3 VLM with ``args`` sizes, eval mode, frozen parameters."""
    side = int(round(args.image_tokens**0.5))
    if side * side != args.image_tokens:
        raise SystemExit("--image-tokens must be a perfect square")
    layer_types = [
        "full_attention" if (i + 1) % args.global_every == 0 else "sliding_attention" for i in range(args.layers)
    ]
    text = Gemma3TextConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        query_pre_attn_scalar=args.head_dim,
        sliding_window=args.sliding_window,
        layer_types=layer_types,
        max_position_embeddings=4096,
    )
    patch = 4
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=side * patch,
        patch_size=patch,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=args.image_tokens,
        boi_token_index=BOI,
        eoi_token_index=EOI,
        image_token_index=IMAGE,
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # initialise where it runs (a 4B model on a GPU in seconds)
        model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, proj.shape[0] ** -0.5)  # Gemma 3 init zeroes it
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    model.eval()
    model.requires_grad_(False)
    return model


def build_inputs(model: Gemma3ForConditionalGeneration, args: argparse.Namespace):
    """[bos, prompt, boi, image x M, eoi, suffix, answer]; 6 single-token and 2 span targets."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    low, high = 10, args.vocab

    def text(k: int) -> torch.Tensor:
        return torch.randint(low, high, (k,), generator=gen)

    ids = torch.cat(
        [
            torch.tensor([2]),
            text(args.prompt_tokens),
            torch.tensor([BOI]),
            torch.full((args.image_tokens,), IMAGE),
            torch.tensor([EOI]),
            text(8),
            text(args.answer_tokens),
        ]
    )[None].long()
    n = ids.shape[1]
    prompt_length = n - args.answer_tokens
    side = model.config.vision_config.image_size
    pixels = (torch.rand((1, 3, side, side), generator=gen) * 2 - 1).to(args.device, model.dtype)
    token_types = (ids == IMAGE).long()
    n_single = max(args.targets - 2, 0)
    span_starts = torch.linspace(prompt_length, n - 1, steps=n_single).round().long().tolist()
    targets = [Target(p, p + 1, "token") for p in span_starts]
    if args.targets >= 2:
        targets.append(Target(prompt_length + 5, prompt_length + 9, "span4"))
        targets.append(Target(n - 3, n, "span3"))
    targets = targets[: args.targets]
    return ids.to(args.device), pixels, token_types.to(args.device), targets, prompt_length


# --------------------------------------------------------------------------------------------
# measurement


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_kib() -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmRSS:\s+(\d+)", text)
    return int(m.group(1)) if m else None


def _hwm_kib() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_cpu_peak() -> bool:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_time(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        del result
    return statistics.median(times)


def measure_peak(fn: Callable[[], object], device: str) -> float | None:
    """Peak extra memory of one run of ``fn`` in MiB (see the module docstring), or None."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        _sync(device)
        del result
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not _reset_cpu_peak():
        return None
    base = _rss_kib()
    result = fn()
    del result
    hwm = _hwm_kib()
    return None if base is None or hwm is None else (hwm - base) / 1024


def _cpu_peaks_in_child() -> dict[str, float | None]:
    """Run the memory measurements in a child process with glibc's mmap threshold at 64 KiB.

    Large blocks are then mmapped and returned to the system on free, so that the resident set
    follows the live tensors; it slows allocation, hence a separate process from the timings.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--memory-child"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY_JSON "):
            return json.loads(line[len("MEMORY_JSON ") :])
    print(f"memory measurement failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return {}


def _fmt_mem(x: float | None) -> str:
    return "n/a" if x is None else f"{x:8.1f} MiB"


def profile_engine(run: Callable[[], object], forward: Callable[[], object], device: str, top: int = 12) -> None:
    """Where one engine call spends its time: the engine's own phase timings (forward with
    attention capture, batched vector-Jacobian products + Chefer propagation, attention-only
    methods), beside a plain forward, and torch.profiler's operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    run(), forward()  # warm-up
    t0 = time.perf_counter()
    forward()
    _sync(device)
    t_fwd = time.perf_counter() - t0
    out = run()
    phases = {k: v for k, v in out.timings.items() if k != "total"}
    total = out.timings.get("total", sum(phases.values()))
    print(f"\nplain no-grad forward: {t_fwd:.4f} s; engine total {total:.4f} s ({total / t_fwd:.2f}x)")
    for phase, sec in phases.items():
        print(f"engine phase {phase:18s} {sec:8.4f} s  {sec / total:6.1%}  {sec / t_fwd:6.2f}x a plain forward")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        run()
        _sync(device)
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--global-every", type=int, default=6, help="every k-th layer is global (Gemma 3: 6)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--sliding-window", type=int, default=128)
    p.add_argument("--image-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=12)
    p.add_argument("--answer-tokens", type=int, default=40)
    p.add_argument("--targets", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--ig-steps", type=int, default=16, help="integrated_gradients: midpoint steps")
    p.add_argument("--ig-batch", type=int, default=16, help="integrated_gradients: variants per pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="only profile one engine call (chefer): its phase timings and the top operators")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    torch.set_grad_enabled(True)
    model = build_model(args)
    ids, pixels, types, targets, prompt_length = build_inputs(model, args)
    n, n_t = ids.shape[1], len(targets)
    print(
        f"model: {args.layers} layers ({model.config.text_config.layer_types.count('full_attention')} global), "
        f"hidden {args.hidden}, {args.heads} heads / {args.kv_heads} kv, vocab {args.vocab}, "
        f"{args.image_tokens} image tokens, N = {n}, {n_t} targets, {args.dtype} on {args.device}, "
        f"torch threads {torch.get_num_threads()}"
    )

    def plain_forward():
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=pixels, token_type_ids=types, use_cache=False).logits

    def engine(methods, chunk_size=args.chunk_size):
        return lambda: explain_sequence(
            model, ids, pixels, types, targets, methods, prompt_length=prompt_length, chunk_size=chunk_size,
            ig_steps=args.ig_steps, perturbation_batch_size=args.ig_batch,
        )

    spans = [(t.start, t.end) for t in targets]
    ref_name = "reference chefer (per-target backward)"
    runs: list[tuple[str, Callable[[], object], int, bool]] = [
        ("plain no-grad forward", plain_forward, args.repeats, False),
        (f"engine chefer (chunk_size {args.chunk_size})", engine(["chefer"]), args.repeats, True),
        ("engine chefer (chunk_size 1)", engine(["chefer"], 1), args.repeats, True),
        (f"engine all methods (chunk_size {args.chunk_size})", engine(list(METHODS)), args.repeats, True),
        (f"engine legrad (chunk_size {args.chunk_size})", engine(["legrad"]), args.repeats, True),
        ("engine chefer + legrad (shared VJPs)", engine(["chefer", "legrad"]), args.repeats, True),
        ("engine gradcam", engine(["gradcam"]), args.repeats, True),
        (f"engine integrated_gradients ({args.ig_steps} steps)", engine(["integrated_gradients"]),
         max(1, args.repeats - 1), True),
        ("engine attnlrp", engine(["attnlrp"]), args.repeats, True),
    ]
    if not args.skip_reference:
        from reference_chefer import reference_chefer

        def reference():
            return reference_chefer(model, ids, pixels, types, spans)

        runs.append((ref_name, reference, max(1, args.repeats - 1), True))

    if args.profile:
        profile_engine(engine(["chefer"]), plain_forward, args.device)
        return

    if args.memory_child:
        peaks = {}
        for name, fn, _, _ in runs:
            fn()  # warm-up
            peaks[name] = measure_peak(fn, args.device)
        print("MEMORY_JSON " + json.dumps(peaks))
        return

    check = engine(["chefer"])()
    print(
        f"self-checks: image_tokens_ok={check.image_tokens_ok} argmax_matches={check.argmax_matches} "
        f"(random answer, expected False) batched={check.batched} forward_len={check.forward_len}"
    )
    ig = engine(["integrated_gradients"])()
    rel = [r.maps["integrated_gradients"].extras["completeness_error"]
           / max(abs(r.maps["integrated_gradients"].extras["score_delta"]), 1e-12) for r in ig.results]
    print(f"integrated_gradients ({args.ig_steps} steps): completeness error / |S(x) - S(baseline)| "
          f"median {statistics.median(rel):.2e}, max {max(rel):.2e}")
    lrp = engine(["attnlrp"])()
    cons = [r.maps["attnlrp"].extras["conservation_error"] / max(abs(r.score), 1e-12) for r in lrp.results]
    print(f"attnlrp: conservation error / |S| median {statistics.median(cons):.2e}, max {max(cons):.2e}")
    if not args.skip_reference:
        ref = reference()
        diff = max(
            float((torch.as_tensor(check.map(i, "chefer").text_map, device=r.device) - r).abs().max() / r.abs().max())
            for i, r in enumerate(ref)
        )
        print(f"engine vs reference (chefer text maps): max relative difference {diff:.2e}")
        del ref

    times = {name: measure_time(fn, args.device, reps) for name, fn, reps, _ in runs}
    if args.device.startswith("cuda"):
        mems = {}
        for name, fn, _, _ in runs:
            mems[name] = measure_peak(fn, args.device)
    else:
        mems = _cpu_peaks_in_child()

    print(f"\n{'':45s} {'total s':>9s} {'per target s':>13s} {'peak extra mem':>15s}")
    for name, _, _, per in runs:
        per_s = f"{times[name] / n_t:13.4f}" if per else ""
        print(f"{name:45s} {times[name]:9.4f} {per_s:>13s} {_fmt_mem(mems.get(name)):>15s}")
    eng = f"engine chefer (chunk_size {args.chunk_size})"
    t_fwd = times["plain no-grad forward"]
    print()
    print(f"engine chefer, all {n_t} targets / one plain forward:     {times[eng] / t_fwd:7.2f}x time")
    all_name = f"engine all methods (chunk_size {args.chunk_size})"
    print(f"engine all methods, all {n_t} targets / one plain forward: {times[all_name] / t_fwd:7.2f}x time")
    if ref_name in times:
        line = f"engine chefer / reference (per target):              {times[eng] / times[ref_name]:7.3f}x time"
        m_eng, m_ref = mems.get(eng), mems.get(ref_name)
        if m_eng is not None and m_ref:
            line += f", {m_eng / m_ref:.3f}x peak memory"
        print(line)


if __name__ == "__main__":
    main()
