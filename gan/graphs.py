"""perf.cuda_graphs: the whole training step (D update, G update, both Adam updates, the BN
buffer updates) captured once as one CUDA graph and replayed every step.

Why: at the seed's batch 64 the step is launch-bound (on an H100, 12.5 ms of kernels in a
19.8 ms step, issue 11); a replay issues all of its kernels with one call.
``torch.compile(mode="reduce-overhead")`` cannot graph it (the fake batch crosses the D and the G
step), so the capture is manual, after the PyTorch docs' whole-network recipe:

- the batch is copied into a static input buffer; the stats returned are static outputs that
  the next replay overwrites (the loop sums them in place before that, on the same stream);
- Adam runs with ``capturable=True`` (its step counts live on the device, see gan/perf.py);
- the step's generator is registered with the graph. A replay reads the seed that
  ``gen.manual_seed`` set before it, with the offsets counted from 0, as the eager step does:
  the step draws the same numbers either way and resume stays exact;
- capture needs warm-up iterations (cuDNN plans, compile, Adam's lazy state). They are undone
  (:func:`undone`): every parameter, buffer and optimizer state tensor is written back in place
  and state born in the warm-up is zeroed, Adam's fresh state, so the first real step starts
  from exactly the state the eager path would.

Shapes are fixed at capture: a batch of another shape runs eagerly, on the same tensors.
Not under DDP (its all-reduce hooks are not captured here) nor with diffaug/ADA (host-side
state): :func:`resolve` says so in one line when the switch is ``on`` and turns ``auto`` off.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from gan.context import unwrap


def resolve(setting: str, device: torch.device, world_size: int, augmenting: bool) -> bool:
    """Whether the step is graphed; ``on`` where it cannot be is a one-line error."""
    why = ("needs a CUDA device, this rank runs on " + device.type if device.type != "cuda"
           else "is not supported with DDP (scale.num_workers > 1) yet" if world_size > 1
           else "is not supported with loss.diffaug (its state is updated on the host)" if augmenting else "")
    if setting == "on" and why:
        raise ValueError(f"perf.cuda_graphs=on {why}; set perf.cuda_graphs=auto or off")
    return setting in ("on", "auto") and not why


def _state(nets) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(parameters and buffers of G and D, every tensor in both optimizers' state)."""
    model = [t for m in (unwrap(nets.G), nets.D_raw) for t in (*m.parameters(), *m.buffers())]
    opt = [v for o in (nets.opt_d, nets.opt_g) for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    return model, opt


@contextlib.contextmanager
def undone(nets):
    """Whatever steps run inside leave the models and optimizers as they found them, each
    tensor written back in place (a captured graph keeps pointing at the same memory)."""
    model, opt = _state(nets)
    saved_model = [t.detach().clone() for t in model]
    saved_opt = {id(t): t.detach().clone() for t in opt}
    try:
        yield
    finally:
        _restore(nets, model, saved_model, saved_opt)


def _restore(nets, model, saved_model, saved_opt) -> None:
    with torch.no_grad():
        now_model, now_opt = _state(nets)
        if [id(t) for t in now_model] != [id(t) for t in model]:
            raise RuntimeError("a parameter or buffer was replaced during the warm-up; cannot graph the step")
        for t, v in zip(model, saved_model):
            t.copy_(v)
        for t in now_opt:  # born in the warm-up: Adam's fresh state is zeros (step 0 included)
            t.copy_(saved_opt[id(t)]) if id(t) in saved_opt else t.zero_()


class GraphedStep:
    """``step(images) -> stats`` replayed from a CUDA graph, captured on the first call."""

    WARMUP = 3  # the docs' recipe: a few iterations on a side stream before capture

    def __init__(self, step: Callable[[torch.Tensor], dict], nets, gen: torch.Generator):
        self.step, self.nets, self.gen = step, nets, gen
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: torch.Tensor | None = None
        self.out: dict[str, torch.Tensor] = {}
        self.error = ""  # why the capture failed (the step then runs eagerly)

    def _capture(self, images: torch.Tensor) -> None:
        seed = self.gen.initial_seed()  # the seed the loop set for this step
        self.static_in = images.detach().clone()
        with undone(self.nets):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP):
                    self.gen.manual_seed(seed)
                    self.step(self.static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.gen)
            self.gen.manual_seed(seed)
            # thread_local: the loader's pinning thread may allocate while this thread captures
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.out = self.step(self.static_in)
        torch.cuda.synchronize()
        self.graph = graph
        self.gen.manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.error:
            return self.step(images)
        if self.graph is None:
            seed = self.gen.initial_seed()
            try:
                self._capture(images)
            except Exception as e:  # slower, never wrong: the state is restored, the step runs eagerly
                self.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                print(f"facegan: perf.cuda_graphs: the capture failed ({self.error}); the step runs eagerly",
                      flush=True)
                self.gen.manual_seed(seed)
                return self.step(images)
        elif images.shape != self.static_in.shape or images.dtype != self.static_in.dtype:
            return self.step(images)  # another shape (a short last batch): eager, same tensors
        self.static_in.copy_(images, non_blocking=True)
        self.graph.replay()
        return self.out
