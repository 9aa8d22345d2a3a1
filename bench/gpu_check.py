"""Issue 26's GPU part, as one short prepared script (a task lent a GPU machine runs it).

A GPT-2 from a config at a realistic size (12 layers, 768 wide, seq 512, batch 8, sdpa,
bf16 autocast, AdamW), three twins stepped in turns: plain, every=1 (default statistics)
and the default cadence (its first ``AUTO_FIRST`` all-recorded steps run untimed, so its
timed steps are sentinel steps); each step timed on the host with
the device synchronised around it (outside the Probe). Then a recorded step and sentinel
steps under ``torch.cuda.set_sync_debug_mode("error")``: the Probe must issue no host
sync (the GPU tests in tests/test_probe_cuda.py say the same on a small model).

Run:  .venv/bin/python bench/gpu_check.py                  # on a CUDA machine, ~3-5 min
      .venv/bin/python bench/gpu_check.py --device cpu --tiny   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from gradprobe import Probe
from gradprobe.recording.clock import AUTO_FIRST


def build(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.layers,
        n_embd=args.width,
        n_head=max(1, args.width // 64),
        n_positions=args.seq,
        vocab_size=args.vocab,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config).to(args.device)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    return model, ids


class Twin:
    def __init__(self, name: str, model: nn.Module, probe: dict[str, Any] | None) -> None:
        self.name = name
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.probe = Probe(model, self.opt, **probe) if probe is not None else None
        self.times: list[float] = []


def step(twin: Twin, ids: torch.Tensor, cast: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    twin.opt.zero_grad(set_to_none=True)
    with cast():
        loss = twin.model(input_ids=ids, labels=ids).loss
    if twin.probe is not None:
        twin.probe.log(loss=loss)
    loss.backward()
    twin.opt.step()
    sync()
    return time.perf_counter() - start


def sync_free(twin: Twin, ids: torch.Tensor, cast: Callable[[], Any], steps: int) -> str:
    """Steps under sync debug mode "error": 'none' or the error a host sync raised."""
    if not torch.cuda.is_available() or ids.device.type != "cuda":
        return "not checked (no CUDA device)"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            twin.opt.zero_grad(set_to_none=True)
            with cast():
                loss = twin.model(input_ids=ids, labels=ids).loss
            twin.probe.log(loss=loss)  # type: ignore[union-attr]
            loss.backward()
            twin.opt.step()
    except RuntimeError as exc:
        return f"a host sync: {exc}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "none"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="a smoke run's sizes")
    args = parser.parse_args(argv)
    if args.tiny:
        args.layers, args.width, args.seq, args.batch, args.vocab, args.steps = 2, 64, 32, 2, 500, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device here (--device cpu --tiny for a smoke run)")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16

    def cast() -> Any:
        return torch.autocast(device.type, dtype=dtype) if cuda or args.tiny else nullcontext()

    base, ids = build(args)
    twins = [
        Twin("plain", base, None),
        Twin("every=1", copy.deepcopy(base), {"every": 1}),
        Twin("default cadence", copy.deepcopy(base), {}),
    ]
    cadence = twins[2]
    for _ in range(AUTO_FIRST + 1):  # its all-recorded first steps, untimed
        step(cadence, ids, cast, sync)
    for twin in twins:  # warm-up: kernels, allocator, the Probe's buffers
        step(twin, ids, cast, sync)
    for i in range(args.steps):
        for twin in twins[i % 3 :] + twins[: i % 3]:  # in turns
            twin.times.append(step(twin, ids, cast, sync))
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(
        f"device: {name}; torch {torch.__version__}; GPT-2 {args.layers}×{args.width}, "
        f"seq {args.seq}, batch {args.batch}, bf16 autocast, AdamW; {args.steps} steps each"
    )
    plain = statistics.median(twins[0].times)
    print("| mode | ms/step p50 | × plain |")
    print("|---|---:|---:|")
    for twin in twins:
        p50 = statistics.median(twin.times)
        print(f"| {twin.name} | {p50 * 1e3:.1f} | {p50 / plain:.3f} |")
    print(f"host syncs in 2 recorded steps (every=1): {sync_free(twins[1], ids, cast, 2)}")
    print(f"host syncs in 3 sentinel steps (cadence): {sync_free(cadence, ids, cast, 3)}")
    for twin in twins:
        if twin.probe is not None:
            twin.probe.close()


if __name__ == "__main__":
    main()
