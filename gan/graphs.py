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
           else "is not supported with loss.diffaug or loss.r1_gamma (steps that differ from one another)" if augmenting
           else "")
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


def gap(before: list[torch.Tensor], eager: list[torch.Tensor], graphed: list[torch.Tensor]) -> float:
    """How far the graphed step's result is from the eager one, relative to the step itself:
    ||graphed - eager|| / ||eager - before|| over the tensors taken together. Float rounding and
    atomics give ~0 (a few Adam signs flipping at a near-zero gradient weigh little against
    every element's update); a graph that draws other random numbers or misses an update gives
    ~1."""
    num = sum(float((g.double() - e.double()).square().sum()) for g, e in zip(graphed, eager))
    den = sum(float((e.double() - b.double()).square().sum()) for e, b in zip(eager, before))
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


class GraphedStep:
    """``step(images) -> stats`` replayed from a CUDA graph, captured on the first call.

    The first call also checks the graph on this machine: the first step runs eagerly, is
    undone, then replayed from the graph with the same seed, and the two results are compared
    (:func:`gap`, parameters and BN buffers apart). The graph is captured under another seed
    than the one checked, so a graph that baked its random numbers in fails the check. Past
    ``TOLERANCE`` the step says so in one line and runs eagerly from the eager result: slower,
    never wrong."""

    WARMUP = 3  # the docs' recipe: a few iterations on a side stream before capture
    TOLERANCE = 0.1  # bf16 rounding differences measure ~1e-2 at most; a wrong graph ~1

    def __init__(self, step: Callable[[torch.Tensor], dict], nets, gen: torch.Generator):
        self.step, self.nets, self.gen = step, nets, gen
        self.graph = None
        self.static_in: torch.Tensor | None = None
        self.out: dict[str, torch.Tensor] = {}
        self.error = ""  # why the graph is not used (the step then runs eagerly)
        self.checked_gap: float | None = None  # the first step's graphed-vs-eager gap

    def _record(self, seed: int):
        """The CUDA part: warm-up (undone), then capture; returns (graph, static outputs)."""
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
                out = self.step(self.static_in)
        torch.cuda.synchronize()
        return graph, out

    def _groups(self) -> list[list[torch.Tensor]]:
        nets = [unwrap(self.nets.G), self.nets.D_raw]
        return [[p for m in nets for p in m.parameters()],
                [b for m in nets for b in m.buffers() if b.is_floating_point()]]

    def _first(self, images: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """Captures, checks the graph against the eager step, and returns the first step's stats."""
        self.static_in = images.detach().clone()
        self.graph, self.out = self._record(seed ^ 0x5EED)
        groups = self._groups()
        before = [[t.detach().clone() for t in g] for g in groups]
        with undone(self.nets):  # the eager reference, then back to the state before it
            self.gen.manual_seed(seed)
            self.step(images)
            eager = [[t.detach().clone() for t in g] for g in groups]
        everything = [t for ts in _state(self.nets) for t in ts]  # counters and Adam's state too
        saved = [t.detach().clone() for t in everything]
        self.gen.manual_seed(seed)
        out = self._replay(images)
        self.checked_gap = max(gap(b, e, [t.detach() for t in g]) for b, e, g in zip(before, eager, groups))
        if self.checked_gap <= self.TOLERANCE:
            return out
        self.error = f"the graphed step differs from the eager one (gap {self.checked_gap:.3g} > {self.TOLERANCE})"
        with torch.no_grad():  # back to the state before the step, then the step eagerly
            for t, v in zip(everything, saved):
                t.copy_(v)
        raise _Mismatch(self.error)

    def _replay(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.static_in.copy_(images, non_blocking=True)
        self.graph.replay()
        return self.out

    def __call__(self, images: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        """``step``: for the eager step's R1 schedule (graphs are off whenever R1 is on)."""
        if self.error:
            return self.step(images, step=step)
        if self.graph is None:
            seed = self.gen.initial_seed()  # the seed the loop set for this step
            try:
                return self._first(images, seed)
            except Exception as e:  # slower, never wrong: the state is restored, the step runs eagerly
                if not isinstance(e, _Mismatch):
                    self.error = f"the capture failed ({type(e).__name__}: {_first_line(e)})"
                print(f"facegan: perf.cuda_graphs: {self.error}; the step runs eagerly", flush=True)
                self.gen.manual_seed(seed)
                return self.step(images, step=step)
        if images.shape != self.static_in.shape or images.dtype != self.static_in.dtype:
            return self.step(images, step=step)  # another shape (a short last batch): eager, same tensors
        return self._replay(images)


class _Mismatch(RuntimeError):
    pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
