"""Command line: ``python -m moestream``.

``python -m moestream run CHECKPOINT --prompt "..."`` streams a transformers checkpoint with
:func:`moestream.load_offloaded` (the full model is never in memory), tokenises the prompt with the
checkpoint's tokenizer, prints the generated text as it comes (stdout) and then what it cost
(stderr): tokens/s, bytes read per token, peak memory and, for MoE models whose experts are cached,
the expert-cache hit rate.

``python -m moestream bench ...`` is ``python -m moestream.bench ...``.

Exit status: 0; 1 when the run failed (the message says why); 2 for a usage error.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence

__all__ = ["build_parser", "main", "quiet_broken_pipe", "run"]


def quiet_broken_pipe(main_fn: Callable[..., int]) -> Callable[..., int]:
    """Wraps a command's ``main`` so that a reader closing the pipe early (``| head``) ends it
    quietly instead of with a BrokenPipeError traceback (the usual shell convention, exit 141)."""

    @functools.wraps(main_fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = main_fn(*args, **kwargs)
            sys.stdout.flush()  # a write that fails here would otherwise fail at interpreter exit
            return rc
        except BrokenPipeError:
            # Python flushes stdout once more at exit: point it at /dev/null so that fails silently
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141

    return wrapper


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moestream",
        description="moestream: fast MoE kernels and weight streaming for PyTorch.",
        epilog="python -m moestream run --help for the options of a run; "
        "python -m moestream bench --help for the benchmark runner.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser(
        "run",
        help="generate text with a checkpoint streamed from disk or host memory",
        description="Generate text with a transformers checkpoint streamed by moestream.load_offloaded: "
        "the weights stay on disk (or in host memory) and each layer (each expert, for MoE models) is "
        "loaded just ahead of use. Prints the text as it is generated, then tokens/s, bytes read per "
        "token, peak memory and, for MoE models, the expert-cache hit rate (on stderr).",
    )
    r.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a directory with config.json, safetensors and a tokenizer"
    )
    r.add_argument("--prompt", required=True, help="the text to continue")
    r.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default %(default)s)")
    r.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    r.add_argument(
        "--max-device-memory",
        help="budget for the weights on the device, e.g. 4GiB (default: everything but the layers resident)",
    )
    r.add_argument(
        "--storage",
        choices=("disk", "cpu"),
        default="disk",
        help="where the weights wait: 'disk' (read from the checkpoint at every use) or 'cpu' "
        "(read once into host memory) (default %(default)s)",
    )
    r.add_argument("--prefetch", type=int, default=2, help="layers loaded ahead (default %(default)s)")
    r.add_argument(
        "--experts",
        choices=("cache", "layer"),
        help="MoE models: 'cache' streams each expert on its own into a device-side cache (the default "
        "where the experts allow it), 'layer' streams whole layers with every expert",
    )
    r.add_argument(
        "--compress",
        choices=("int8", "int4"),
        help="stream the blocks' linears and experts compressed (group-wise, quantized while loading "
        "unless the checkpoint is compressed already)",
    )
    r.add_argument(
        "--group-size",
        type=int,
        default=64,
        help="input elements per quantization group with --compress (32-128; default %(default)s)",
    )
    r.add_argument(
        "--patch-moe",
        action="store_true",
        help="run the MoE blocks on moestream's fused router and experts (ms.patch_moe) before streaming",
    )
    r.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)"
    )
    r.add_argument("--seed", type=int, default=0, help="random seed for sampling (default %(default)s)")
    r.add_argument("--tokenizer", help="tokenizer directory or name (default: the checkpoint's)")
    r.add_argument("--no-stream", action="store_true", help="print the text once, at the end")
    sub.add_parser("bench", help="the benchmark runner (python -m moestream.bench)", add_help=False)
    return p


def _device(spec: str | None, parser: argparse.ArgumentParser):
    import torch

    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        parser.error(f"--device {spec!r}: expected cpu, cuda or cuda:N")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device {spec!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {spec}: no CUDA device is available to this torch")
    return dev


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, out=None, err=None) -> int:
    """``python -m moestream run``: load, generate (streaming the text to ``out``), report to ``err``."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    import torch

    import moestream as ms

    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if args.prefetch < 0:
        parser.error("--prefetch must be at least 0")
    if args.temperature < 0:
        parser.error("--temperature must be at least 0")
    if not os.path.isdir(args.checkpoint):
        parser.error(f"CHECKPOINT {args.checkpoint!r} is not a directory")
    device = _device(args.device, parser)
    try:
        from .integrations import hf_text
    except ImportError:
        print("error: the run command needs transformers: pip install 'moestream[transformers]'", file=err)
        return 1
    tokenizer = hf_text.load_tokenizer(args.tokenizer or args.checkpoint)

    kwargs = {}
    if args.experts is not None:
        kwargs["experts"] = args.experts
    if args.compress is not None:
        from .quant import QuantScheme

        try:
            kwargs["compress"] = QuantScheme(args.compress, args.group_size)
        except ValueError as e:
            parser.error(f"--group-size: {e}")
    model = None
    if args.patch_moe:
        # patch_moe must see the transformers blocks before their weights are streamed
        from .integrations.hf_checkpoint import empty_model

        model = empty_model(args.checkpoint)
        try:
            n = ms.patch_moe(model)
        except ValueError as e:
            print(f"error: --patch-moe: {e}", file=err)
            return 1
        print(f"[moestream] patch_moe: {n} MoE blocks on moestream's kernels", file=err)
    t0 = time.perf_counter()
    try:
        model = ms.load_offloaded(
            args.checkpoint,
            device=device,
            max_device_memory=args.max_device_memory,
            storage=args.storage,
            prefetch=args.prefetch,
            model=model,
            **kwargs,
        )
    except (ValueError, RuntimeError, OSError, NotImplementedError) as e:
        # a budget too small, a checkpoint that does not match its config, ...: the message says which
        print(f"error: {e}", file=err)
        return 1
    load_s = time.perf_counter() - t0
    state = ms.offload.get_state(model)
    plan_stats = ms.offload_stats(model)
    print(
        f"[moestream] loaded {args.checkpoint} in {load_s:.2f} s: {plan_stats['units']} streamed units "
        f"({_fmt_bytes(plan_stats['streamed_bytes'])}), {_fmt_bytes(plan_stats['resident_bytes'])} resident, "
        f"experts: {plan_stats['experts']}, device {device}, storage {args.storage}",
        file=err,
    )

    enc = tokenizer(args.prompt, return_tensors="pt")
    input_ids = enc["input_ids"].to(device)
    attention_mask = enc.get("attention_mask")
    gen = {"max_new_tokens": args.max_new_tokens}
    if attention_mask is not None:
        gen["attention_mask"] = attention_mask.to(device)
    if args.temperature > 0:
        torch.manual_seed(args.seed)
        gen.update(do_sample=True, temperature=args.temperature)
    else:
        gen.update(do_sample=False)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        gen["pad_token_id"] = tokenizer.eos_token_id
    streamer = hf_text.timed_streamer(tokenizer, out, enabled=not args.no_stream)

    state.reset_stats()  # count what generation reads, not what loading did
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(input_ids, streamer=streamer, **gen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total_s = time.perf_counter() - t0
    new_ids = output[0, input_ids.shape[1] :]
    if args.no_stream:
        out.write(tokenizer.decode(new_ids, skip_special_tokens=True) + "\n")
        out.flush()

    stats = ms.offload_stats(model)
    n_new = int(new_ids.numel())
    times = streamer.token_times
    lines = [f"[moestream] {n_new} new tokens in {total_s:.2f} s: {n_new / total_s:.2f} tokens/s"]
    if len(times) >= 2:
        # after the first token: the decode rate, without the prompt's prefill
        decode = (len(times) - 1) / (times[-1] - times[0]) if times[-1] > times[0] else float("inf")
        lines[-1] += f" ({decode:.2f} tokens/s after the first, first token after {times[0] - t0:.2f} s)"
    per = max(n_new, 1)
    lines.append(
        f"[moestream] bytes read per token: {_fmt_bytes(stats['bytes_read'] / per)} from storage "
        f"({args.storage}), {_fmt_bytes(stats['bytes_loaded'] / per)} loaded into slots "
        f"({_fmt_bytes(stats['bytes_read'])} / {_fmt_bytes(stats['bytes_loaded'])} in all, prefill included)"
    )
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        lines.append(
            f"[moestream] peak device memory: {_fmt_bytes(peak)} allocated by torch "
            f"(moestream: {_fmt_bytes(stats['device_bytes'])} of weights, slots and read buffers)"
        )
    else:
        rss = _peak_rss_bytes()
        lines.append(
            f"[moestream] peak memory (CPU device): {_fmt_bytes(rss) if rss is not None else 'unknown'} "
            f"resident in this process (moestream: {_fmt_bytes(stats['device_bytes'])} of weights, slots and read buffers)"
        )
    if stats.get("experts") == "cache":
        lines.append(
            f"[moestream] expert cache: hit rate {100 * stats['expert_hit_rate']:.1f}% "
            f"({stats['expert_hits']} hits, {stats['expert_misses']} misses, {stats['expert_slots']} slots); "
            f"next-layer prediction precision {100 * stats['prefetch_precision']:.1f}%, "
            f"recall {100 * stats['prefetch_recall']:.1f}%"
        )
    for line in lines:
        print(line, file=err)
    err.flush()
    return 0


@quiet_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after it belongs to the bench's own parser
        from .bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "run":
        return run(args, parser)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2
