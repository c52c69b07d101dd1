"""CUDA graphs for the UNet: the same kernels as eager PyTorch, launched as one graph per step.

The eager SDXL UNet is bound by the CPU on an H100/H200: one batch-2 step at 1024² issues ~1 500 kernels whose GPU
time adds up to ~41 ms, while the Python and launch work behind them takes 55-80 ms (bench/NOTES.md, session 4).
Replaying a captured graph launches the same kernels, in the same order, on the same data, so the result is
bitwise the eager result; nothing is compiled, so there is nothing to recompile.

A graph reads its inputs from, and writes its outputs to, fixed addresses: each input shape gets its own graph
with static input buffers (`GraphRunner`), inputs are copied in before a replay and outputs cloned out after it.
The weights are read where they were at capture time, which is why LoRA merges write into the weights in place
(`copy_`); if the weights move (the model leaves the GPU and comes back, a dtype change), `begin()` sees new
addresses and drops every graph, so a stale graph is never replayed.

`GraphedUNet` stands in for the UNet inside a pipeline built with `from_pipe(..., unet=...)`, like
stepcache.StepCachedUNet, which also runs its full and shallow steps through a GraphRunner.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

logger = logging.getLogger(__name__)

# Graphs one model keeps before it drops them all and captures afresh: setup captures ~13 (every 1 MP preset), and
# each reference strength, hires size and ControlNet mode adds its own. Captures share one memory pool; each graph
# holds only its static inputs and outputs.
MAX_GRAPHS = 64

Tensors = dict[str, torch.Tensor]
# capture(fn, static_inputs, pool) -> (replay, static_outputs): run fn on the static inputs once as a graph, and
# return a callable that re-runs it (rewriting static_outputs in place) and the outputs it wrote.
Capture = Callable[[Callable[[Tensors], tuple], Tensors, Any], tuple[Callable[[], None], tuple]]


def capture_cuda_graph(fn: Callable[[Tensors], tuple], static_inputs: Tensors, pool: Any):
    """Capture fn as a CUDA graph in `pool` (shared by all of a model's graphs: only one runs at a time)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(static_inputs)  # warm-up outside the capture: library handles and workspaces are made lazily
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread's CUDA call during the capture is not an error for it (global mode makes it one)
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        outputs = fn(static_inputs)
    return graph.replay, outputs


def cuda_graph_pool() -> Any:
    return torch.cuda.graph_pool_handle()


@dataclass
class _Graph:
    replay: Callable[[], None]
    inputs: Tensors
    outputs: tuple


def _attached_part(name: str) -> bool:
    return ".processor." in name or name.startswith("encoder_hid_proj.")


def weight_addresses(modules) -> tuple:
    """Where the modules' weights are (a graph reads them there)."""
    return tuple(t.data_ptr() for module in modules if isinstance(module, torch.nn.Module)
                 for t in (*module.parameters(), *module.buffers()))


def _signature(inputs: Tensors) -> tuple:
    # Strides too: img2img's latents come channels-last out of the VAE, and a graph captured on another layout
    # would run other kernels than eager does on them (not bitwise the same).
    return tuple((name, tuple(t.shape), t.stride(), t.dtype, t.device) for name, t in inputs.items())


class GraphRunner:
    """One graph per (tag, input shapes and dtypes); all of one model's graphs share a memory pool."""

    def __init__(self, capture: Capture, pool_factory: Callable[[], Any] = lambda: None) -> None:
        self.capture = capture
        self.pool_factory = pool_factory
        self.graphs: dict[tuple, _Graph] = {}
        self.pool: Any = None
        self.fingerprint: tuple | None = None
        # Python numbers a capture bakes in that are not inputs (an IP-Adapter's scales): part of every graph's key.
        self.variant: tuple = ()
        self.stats = {"captures": 0, "replays": 0, "dropped": 0, "capture_seconds": 0.0}

    @contextlib.contextmanager
    def variant_of(self, variant: tuple) -> Iterator[None]:
        """Graphs captured and replayed inside are keyed by `variant` too (and only replayed under the same one)."""
        before, self.variant = self.variant, variant
        try:
            yield
        finally:
            self.variant = before

    def begin(self, module: torch.nn.Module) -> None:
        """Before a denoising loop: drop every graph if `module`'s weights are no longer where they were captured.
        An IP-Adapter attached for one request (attention processors, image projection) is not the module's own:
        where its weights are is part of the variant its graphs are keyed by (sdxl/reference.py)."""
        fingerprint = tuple(t.data_ptr() for name, t in (*module.named_parameters(), *module.named_buffers())
                            if not _attached_part(name))
        if fingerprint != self.fingerprint:
            self.drop()
            self.fingerprint = fingerprint

    def drop(self) -> None:
        """Forget every graph (and their memory pool)."""
        if self.graphs:
            self.stats["dropped"] += len(self.graphs)
            logger.info("dropped %d CUDA graphs", len(self.graphs))
        self.graphs.clear()
        self.pool = None

    def forget(self, tag: str) -> None:
        """Forget the graphs of `tag` and of the tags under it (`tag:...`): those of a module that is gone (a user
        ControlNet let go), which would hold pool memory and replay into freed weights; the others stay."""
        stale = [key for key in self.graphs if key[0] == tag or key[0].startswith(tag + ":")]
        for key in stale:
            del self.graphs[key]
        self.stats["dropped"] += len(stale)

    def run(self, tag: str, fn: Callable[[Tensors], tuple], inputs: Tensors) -> tuple:
        """fn(inputs) through this shape's graph (captured on first use); the outputs are fresh tensors."""
        key = (tag, self.variant, _signature(inputs))
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= MAX_GRAPHS:  # every new strength of a reference is a new variant: bounded
                self.drop()
            graph = self._capture(key, fn, inputs)  # its static inputs hold these inputs already
        else:
            for name, value in inputs.items():
                graph.inputs[name].copy_(value)
        # A capture records the kernels without running them: the outputs of the capturing call itself exist only
        # after a replay (seen on an H200: without it the first step at a new shape was garbage).
        graph.replay()
        self.stats["replays"] += 1
        # The next replay rewrites the static outputs: hand out copies.
        return tuple(out.clone() for out in graph.outputs)

    def _capture(self, key: tuple, fn: Callable[[Tensors], tuple], inputs: Tensors) -> _Graph:
        start = time.perf_counter()
        if self.pool is None:
            self.pool = self.pool_factory()
        static = {name: value.clone() for name, value in inputs.items()}
        replay, outputs = self.capture(fn, static, self.pool)
        graph = self.graphs[key] = _Graph(replay, static, tuple(outputs))
        seconds = time.perf_counter() - start
        self.stats["captures"] += 1
        self.stats["capture_seconds"] += seconds
        logger.info("captured a CUDA graph for %s %s in %.3fs", key[0],
                    "x".join(str(d) for d in inputs["sample"].shape) if "sample" in inputs else "", seconds)
        return graph


class UNetStandIn(torch.nn.Module):
    """A module that stands in for a UNet2DConditionModel inside an SDXL pipeline and shares its weights."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    # The attributes the SDXL pipelines read from their UNet.
    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def add_embedding(self):
        return self.unet.add_embedding

    @property
    def encoder_hid_proj(self):
        return self.unet.encoder_hid_proj


def graph_inputs(sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, timestep_cond=None,
                 cross_attention_kwargs=None, added_cond_kwargs=None, **extra) -> Tensors | None:
    """The UNet call as a flat dict of device tensors, or None for a call a graph does not cover (extra inputs such
    as ControlNet residuals, attention kwargs, embeddings other than SDXL's text_embeds + time_ids and IP-Adapter
    image_embeds)."""
    added = dict(added_cond_kwargs or {})
    image_embeds = added.pop("image_embeds", None)
    if extra or timestep_cond is not None or cross_attention_kwargs or set(added) != {"text_embeds", "time_ids"}:
        return None
    if image_embeds is not None and not isinstance(image_embeds, (list, tuple)):
        return None
    tensors = (sample, encoder_hidden_states, added["text_embeds"], added["time_ids"], *(image_embeds or ()))
    if not all(isinstance(t, torch.Tensor) and t.device == sample.device for t in tensors):
        return None
    timestep = torch.as_tensor(timestep, device=sample.device)
    if not timestep.is_floating_point():
        # The UNet turns timesteps into float32 first thing: one graph serves integer and float schedulers alike.
        timestep = timestep.float()
    inputs = dict(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                  text_embeds=added["text_embeds"], time_ids=added["time_ids"])
    inputs.update({f"image_embeds_{i}": t for i, t in enumerate(image_embeds or ())})
    return inputs


def unet_call(unet: torch.nn.Module, inputs: Tensors, **kwargs):
    """The UNet forward on graph_inputs' dict."""
    added = dict(text_embeds=inputs["text_embeds"], time_ids=inputs["time_ids"])
    count = sum(1 for name in inputs if name.startswith("image_embeds_"))
    if count:
        added["image_embeds"] = [inputs[f"image_embeds_{i}"] for i in range(count)]
    return unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], added_cond_kwargs=added,
                **kwargs)


def unet_output(sample: torch.Tensor, return_dict: bool):
    if not return_dict:
        return (sample,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


class GraphedUNet(UNetStandIn):
    """Exact mode: every UNet call the graph covers replays a CUDA graph; any other call runs eagerly."""

    def __init__(self, unet: torch.nn.Module, runner: GraphRunner) -> None:
        super().__init__(unet)
        self.runner = runner
        self.eager_calls = 0

    def begin(self) -> None:
        self.runner.begin(self.unet)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = True,
                **kwargs: Any):
        inputs = graph_inputs(sample, timestep, encoder_hidden_states, **kwargs)
        if inputs is None:
            self.eager_calls += 1
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=return_dict, **kwargs)
        (out,) = self.runner.run("unet", lambda s: (unet_call(self.unet, s).sample,), inputs)
        return unet_output(out, return_dict)
