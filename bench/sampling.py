"""Sampled-token draws: µs per position of the fused kernel and the torch path, and of the
uniforms alone, at the shipped teacher's vocabulary (PYTHONPATH=. python bench/sampling.py).

With ``--device cuda`` it also checks the GPU against the CPU: the uniforms bit for bit, and the
share of positions whose draws on the GPU (parallel cumsum, CUDA's exp) equal the CPU kernel's."""

import argparse
import time

import torch

from pipeline.teacher.sampling import position_keys, sample_teacher, uniforms

def lm_like_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    """As in tests/pipeline/teacher/test_topk.py: a low-rank head over random hidden states, plus noise."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 64, generator=g)
    head = torch.randn(vocab, 64, generator=g) / 8
    return (hidden @ head.T) * scale + torch.randn(rows, vocab, generator=g) * 0.3


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch and kernel threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logits = lm_like_logits(args.positions, args.vocab)
    keys = position_keys(0, torch.arange(args.positions // 256 + 1), 256).flatten()[:args.positions]
    exclude = torch.topk(logits, 64, dim=-1).indices
    per_position = 1e6 / args.positions
    if args.device != "cpu":
        return on_device(args, logits, keys, exclude)
    print(f"P={args.positions} V={args.vocab} N={args.samples}, {torch.get_num_threads()} threads: µs/position")
    print(f"  uniforms alone      {best_of(args.repeats, lambda: uniforms(keys, args.samples)) * per_position:8.2f}")
    for kernel in ("native", "torch"):
        for name, excluded in (("", None), (" + exclude top-64", exclude)):
            seconds = best_of(args.repeats, lambda: sample_teacher(logits, args.samples, 1.0, keys, excluded, kernel=kernel))
            print(f"  {kernel:6s}{name:18s}{seconds * per_position:8.2f}")


def on_device(args, logits, keys, exclude) -> None:
    device = torch.device(args.device)
    same = torch.equal(uniforms(keys.to(device), args.samples).cpu(), uniforms(keys, args.samples))
    print(f"uniforms on {device} equal the CPU's bit for bit: {same}")
    for excluded in (None, exclude):
        cpu = sample_teacher(logits, args.samples, 1.0, keys, excluded, kernel="auto")
        gpu = sample_teacher(logits.to(device), args.samples, 1.0, keys.to(device),
                             None if excluded is None else excluded.to(device), kernel="torch")
        agree = ((gpu["sample_ids"].cpu() == cpu["sample_ids"]).all(-1)
                 & (gpu["sample_counts"].cpu() == cpu["sample_counts"]).all(-1)).float().mean().item()
        print(f"  exclude={'top-64' if excluded is not None else 'none'}: {agree:.5f} of positions draw the same as the CPU")
        on = logits.to(device), keys.to(device), None if excluded is None else excluded.to(device)

        def run():
            sample_teacher(on[0], args.samples, 1.0, on[1], on[2], kernel="torch")
            torch.cuda.synchronize(device)

        print(f"  torch on {device}: {best_of(args.repeats, run) * 1e6 / args.positions:.3f} µs/position")


if __name__ == "__main__":
    main()
