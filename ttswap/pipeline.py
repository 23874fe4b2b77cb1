"""Run a converted model at full speed: ``converted.pipeline(trace=True, command_queues=2)``.

A plain forward dispatches every op from Python, one after another. tt-metal's CNN demos reach their
published throughput another way (``models/tt_cnn``'s ``PipelineConfig(use_trace, num_command_queues,
...)`` and its executors), which this module follows:

* **persistent buffers.** The input is written into the same device buffers on every batch: a DRAM
  staging tensor the host writes, copied on the device into the L1 tensor the first layer reads. The
  outputs are the same device tensors every time.
* **trace.** After one warm-up forward (which compiles every program and moves the weights to the
  device), the device part of the forward is captured once as a ttnn trace and then replayed with
  ``execute_trace``: one command instead of one dispatch per op.
* **two command queues.** Queue 1 writes the next input while queue 0 runs the trace, ordered by ttnn
  events: queue 1 waits until queue 0 has copied the previous input out of the staging buffer, queue 0
  waits until queue 1 has written the new one. Outputs are read on queue 0 without blocking, and a
  batch's outputs are collected only once the next batch has been queued.

The converted graph is split where it crosses the host (:func:`split_stages`): host work before the
uploads, the device layers, host work after the downloads. A trace replays device work only, so a
torch op between two device layers (a fallback whose input is read back from the device and whose
output is uploaded again) makes the forward untraceable: :class:`PipelineError` names it.

On the emulated backend the same API runs the same stages without a trace, so its values are those of
the plain forward. In ttnn's mock mode (ttnn 0.81.1) neither a trace capture nor an event can be issued:
both crash in tt-metal's command assembly (``assemble_device_commands``, ``add_dispatch_wait``), since
mock devices have no host-side command queue; slow dispatch, which has one, refuses traces. There the
pipeline runs with its persistent buffers, one queue and no trace, and :func:`trace_safety` proves with
ttnn's graph capture that the traced part would be legal: no host transfer, and no buffer that outlives
the forward other than its outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import torch
import torch.fx as fx

from ttswap.backends.base import DeviceTensor
from ttswap.modules import Download, TTModule, Upload


log = logging.getLogger("ttswap")

OPS_QUEUE = 0  # runs the trace (or the ops) and reads the outputs, as in tt_cnn's executors
INPUT_QUEUE = 1  # writes the next input while queue 0 computes


class PipelineError(RuntimeError):
    """The converted model cannot run as a traced pipeline; the message names the layer."""


# -- the graph, split at the host boundary ----------------------------------------------------------
@dataclass
class Stages:
    """A converted graph's nodes in execution order, by where they run."""

    head: list[fx.Node]  # placeholders and host nodes before any device work
    uploads: list[fx.Node]  # Upload modules: host -> device
    device: list[fx.Node]  # device layers (TTModule)
    downloads: list[fx.Node]  # Download modules: device -> host
    tail: list[fx.Node]  # host nodes after the downloads, ending with the output node

    @property
    def device_outputs(self) -> list[fx.Node]:
        """The device values the host reads: what a trace must leave allocated."""
        return list(dict.fromkeys(d.args[0] for d in self.downloads))


def _module(gm: fx.GraphModule, node: fx.Node) -> Any:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    module = _module(gm, node)
    if isinstance(module, TTModule):
        return f"device layer {module.layer!r}"
    if module is not None:
        return f"torch module {node.target!r} ({type(module).__name__})"
    if node.op in ("call_function", "call_method"):
        return f"torch op {node.name!r} ({getattr(node.target, '__name__', node.target)})"
    return f"{node.op} {node.name!r}"


def split_stages(gm: fx.GraphModule) -> Stages:
    """Split a converted graph into host head, uploads, device layers, downloads and host tail.

    Raises PipelineError when host work sits between device layers (a value read back from the
    device, computed on in torch and uploaded again), naming the torch op and the layers around it.
    """
    stages = Stages([], [], [], [], [])
    read_back: dict[fx.Node, fx.Node] = {}  # host node -> the Download its value depends on
    for node in gm.graph.nodes:
        module = _module(gm, node)
        sources = [read_back[n] for n in node.all_input_nodes if n in read_back]
        if isinstance(module, Download):
            read_back[node] = node
            stages.downloads.append(node)
        elif isinstance(module, Upload):
            if sources:
                _untraceable(gm, node, sources[0])
            stages.uploads.append(node)
        elif isinstance(module, TTModule):
            stages.device.append(node)
        elif sources:
            read_back[node] = sources[0]
            stages.tail.append(node)
        else:
            stages.head.append(node)
    if not stages.device:
        raise PipelineError("nothing in this model runs on the device: there is no forward to pipeline")
    return stages


def _untraceable(gm: fx.GraphModule, upload: fx.Node, download: fx.Node) -> None:
    """Name the host node that feeds ``upload`` with a value read back at ``download``."""
    host = upload.args[0]
    produced_by = download.args[0]
    consumers = [_describe(gm, u) for u in upload.users]
    raise PipelineError(
        f"the forward cannot be traced: {_describe(gm, host)} runs in torch between device layers; it reads the "
        f"output of {_describe(gm, produced_by)} back from the device, and its result is uploaded again for "
        f"{', '.join(consumers)}. A trace replays device work only: convert that op for the device (see "
        "converted.report.fallbacks), or run the model without a pipeline"
    )


def _last_uses(nodes: Sequence[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the values whose last reader (within ``nodes``) it is: freed right after it,
    as the compiled fx forward does, so that device tensors do not outlive their use."""
    last: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        for value in node.all_input_nodes:
            last[value] = node
    freed: dict[fx.Node, list[fx.Node]] = {}
    for value, reader in last.items():
        freed.setdefault(reader, []).append(value)
    return freed


def _run(gm: fx.GraphModule, nodes: Sequence[fx.Node], env: dict[fx.Node, Any], freed: dict[fx.Node, list[fx.Node]],
         keep: frozenset[fx.Node] = frozenset(), around: Callable[[fx.Node], ContextManager] | None = None) -> Any:
    """Run ``nodes`` in order on values in ``env``; returns the output node's value, if it ran.
    ``around(node)``, if given, is entered around each node's call and the freeing of what it last read."""
    result = None
    for node in nodes:
        with around(node) if around is not None else contextlib.nullcontext():
            result = _step(gm, node, env, freed, keep, result)
    return result


def _step(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any], freed: dict[fx.Node, list[fx.Node]],
          keep: frozenset[fx.Node], result: Any) -> Any:
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_module":
        env[node] = gm.get_submodule(node.target)(*args, **kwargs)
    elif node.op == "call_function":
        env[node] = node.target(*args, **kwargs)
    elif node.op == "call_method":
        env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
    elif node.op == "get_attr":
        env[node] = _attribute(gm, node.target)
    elif node.op == "output":
        result = args[0]
    del args, kwargs
    for value in freed.get(node, ()):
        if value not in keep:
            env.pop(value, None)  # the last reference: ttnn frees its buffer now
    return result


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


# -- the pipeline ---------------------------------------------------------------------------------
class Pipeline:
    """``converted.pipeline(...)``: call it on a batch (torch in, torch out, as the converted model),
    or on an iterable of batches (a list of outputs); :meth:`stream` yields them one by one.

    ``traced`` and ``command_queues`` say what actually runs: the emulated backend and ttnn's mock mode
    run without a trace, on one queue (see the module docstring).
    """

    def __init__(self, converted: torch.nn.Module, trace: bool = True, command_queues: int = 2):
        # ``converted`` is a ttswap ConvertedModel; the pipeline sits above the converter and only reads
        # its graph_module and backend, so it does not import it
        if command_queues not in (1, 2):
            raise ValueError(f"command_queues must be 1 or 2, got {command_queues!r}")
        self.converted = converted
        self.gm = converted.graph_module
        self.stages = split_stages(self.gm)
        self.requested = (trace, command_queues)
        self._placeholders = [n for n in self.stages.head if n.op == "placeholder"]
        self._head_freed = _last_uses(self.stages.head + self.stages.uploads)
        self._device_freed = _last_uses(self.stages.device)
        self._tail_freed = _last_uses(self.stages.downloads + self.stages.tail)
        self._device_outputs = frozenset(self.stages.device_outputs)
        self._tail_nodes = frozenset(self.stages.tail + self.stages.downloads)
        # host values computed before the device part that the tail reads too: kept until then
        self._kept_for_tail = frozenset(n for n in self.stages.head if any(u in self._tail_nodes for u in n.users))
        self._engine = _engine_for(self, trace, command_queues)
        self.traced, self.command_queues = self._engine.traced, self._engine.command_queues

    def __repr__(self) -> str:
        return (f"Pipeline({self.converted.report.model}, backend={self.converted.backend.name}, "
                f"traced={self.traced}, command_queues={self.command_queues})")

    # -- public API ------------------------------------------------------------------------------
    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor) or _is_tensor_tuple(batch):
            return next(self.stream([batch]))
        return list(self.stream(batch))

    def stream(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Run each batch; a batch's outputs are collected once the next batch has been queued, so
        that its upload overlaps the device work (on two queues)."""
        pending = None
        for batch in batches:
            inputs = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
            self.converted._check_inputs(inputs)
            queued = self._queue(inputs)
            if pending is not None:
                yield self._collect(pending)
            pending = queued
        if pending is not None:
            yield self._collect(pending)

    def close(self) -> None:
        """Release the trace, if any. The pipeline cannot run afterwards."""
        self._engine.close()

    # -- stages ----------------------------------------------------------------------------------
    def _queue(self, inputs: tuple[torch.Tensor, ...]) -> "_Queued":
        env: dict[fx.Node, Any] = {}
        for node, value in zip(self._placeholders, inputs):
            env[node] = value
        for node in self._placeholders[len(inputs):]:
            env[node] = node.args[0]  # the placeholder's default
        with torch.no_grad():
            _run(self.gm, [n for n in self.stages.head if n.op != "placeholder"], env, self._head_freed,
                 keep=self._kept_for_tail)
            host_inputs = {u: fx.node.map_arg(u.args[0], lambda n: env[n]) for u in self.stages.uploads}
            device_values = self._engine.run(host_inputs)
            reads = {d: self._engine.read(device_values[d.args[0]]) for d in self.stages.downloads}
        env = {n: v for n, v in env.items() if n in self._kept_for_tail}
        return _Queued(env, reads)

    def _collect(self, queued: "_Queued") -> Any:
        env = queued.env
        with torch.no_grad():
            for download, read in queued.reads.items():
                module: Download = self.gm.get_submodule(download.target)
                env[download] = module(self._engine.finish(read))
            return _run(self.gm, self.stages.tail, env, self._tail_freed)

    # for the engines
    def run_device(self, uploaded: dict[fx.Node, DeviceTensor],
                   around: Callable[[fx.Node], ContextManager] | None = None) -> dict[fx.Node, DeviceTensor]:
        """The device layers on uploaded inputs; returns the values the downloads read."""
        env: dict[fx.Node, Any] = dict(uploaded)
        _run(self.gm, self.stages.device, env, self._device_freed, keep=self._device_outputs, around=around)
        return {n: env[n] for n in self.stages.device_outputs}

    def upload_module(self, node: fx.Node) -> Upload:
        return self.gm.get_submodule(node.target)


@dataclass
class _Queued:
    env: dict[fx.Node, Any]  # host values the tail still needs
    reads: dict[fx.Node, Any] = field(default_factory=dict)  # per download: the engine's pending read


def _is_tensor_tuple(batch: Any) -> bool:
    return isinstance(batch, tuple) and bool(batch) and all(isinstance(x, torch.Tensor) for x in batch)


# -- engines: how the device part runs --------------------------------------------------------------
class _Engine:
    traced = False
    command_queues = 1

    def run(self, host_inputs: dict[fx.Node, torch.Tensor]) -> dict[fx.Node, DeviceTensor]:
        raise NotImplementedError

    def read(self, value: DeviceTensor) -> Any:
        """Start reading ``value`` back; :meth:`finish` completes it as a DeviceTensor the Download takes."""
        return value

    def finish(self, read: Any) -> DeviceTensor:
        return read

    def close(self) -> None:
        pass


class _PlainEngine(_Engine):
    """Upload, run the device layers op by op, download: the plain forward's own steps."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def run(self, host_inputs: dict[fx.Node, torch.Tensor]) -> dict[fx.Node, DeviceTensor]:
        uploaded = {u: self.pipeline.upload_module(u)(x) for u, x in host_inputs.items()}
        return self.pipeline.run_device(uploaded)


class _TtnnEngine(_Engine):
    """Persistent input and output buffers, a trace, and two command queues ordered by events, as
    tt_cnn's ``MultiCQTracedModelOverlappedInputExecutor``; in mock mode only the buffers (see the
    module docstring). Compiles on the first batch."""

    def __init__(self, pipeline: Pipeline, trace: bool, command_queues: int):
        import ttnn

        self.ttnn, self.pipeline = ttnn, pipeline
        self.backend = pipeline.converted.backend
        opened = getattr(self.backend, "command_queues", 1)
        if self.backend.mock:
            if trace or command_queues > 1:
                log.warning("ttnn mock mode cannot capture a trace or record events (tt-metal 0.81.1 crashes): the "
                            "pipeline runs with persistent buffers on one command queue, without a trace; "
                            "ttswap.pipeline.trace_safety checks that the forward could be traced")
            trace, command_queues = False, 1
        elif command_queues > opened:
            raise PipelineError(f"the device was opened with {opened} command queue(s); {command_queues} asked for")
        self.traced, self.command_queues = trace, command_queues
        self.staging: dict[fx.Node, Any] = {}  # per upload: the DRAM tensor the host writes
        self.inputs: dict[fx.Node, DeviceTensor] = {}  # per upload: the L1 tensor the first layers read
        self.outputs: dict[fx.Node, DeviceTensor] = {}  # the trace's outputs, the same tensors every batch
        self.trace_id: Any = None
        self.op_event: Any = None  # queue 0 has copied the staged input out: queue 1 may overwrite it

    @property
    def device(self) -> Any:
        return self.backend.device

    def run(self, host_inputs: dict[fx.Node, torch.Tensor]) -> dict[fx.Node, DeviceTensor]:
        if not self.inputs:
            self._compile(host_inputs)
        self._write(host_inputs)
        if self.traced:
            self.ttnn.execute_trace(self.device, self.trace_id, cq_id=OPS_QUEUE, blocking=False)
            return self.outputs
        return self.pipeline.run_device(self.inputs)

    def _compile(self, host_inputs: dict[fx.Node, torch.Tensor]) -> None:
        ttnn = self.ttnn
        # the plain forward once: builds every program and leaves the weights prepared on the device
        self.pipeline.run_device({u: self.pipeline.upload_module(u)(x) for u, x in host_inputs.items()})
        for upload, x in host_inputs.items():
            placed = self.pipeline.upload_module(upload)(x)  # where the first layers expect their input
            tensor = placed.payload  # its shape is one chip's share on a mesh
            self.staging[upload] = ttnn.allocate_tensor_on_device(
                tensor.shape, tensor.dtype, tensor.layout, self.device, ttnn.DRAM_MEMORY_CONFIG)
            self.inputs[upload] = placed
        if not self.traced:
            return
        addresses = {u: t.payload.buffer_address() for u, t in self.inputs.items()}
        self.trace_id = ttnn.begin_trace_capture(self.device, cq_id=OPS_QUEUE)
        try:
            self.outputs = self.pipeline.run_device(self.inputs)
        finally:
            ttnn.end_trace_capture(self.device, self.trace_id, cq_id=OPS_QUEUE)
        # a first layer that frees its input freed the persistent one during the capture: allocate it
        # again, where the trace reads it (tt_cnn checks the address the same way)
        for upload, placed in self.inputs.items():
            if not placed.payload.is_allocated():
                again = ttnn.allocate_tensor_on_device(placed.payload.spec, self.device)
                if again.buffer_address() != addresses[upload]:
                    raise PipelineError(
                        f"the input of {_consumers(self.pipeline, upload)} was re-allocated at "
                        f"{again.buffer_address()}, not at {addresses[upload]} where the trace reads it; set "
                        "deallocate = false on the first layer in the recipe")
                self.inputs[upload] = dataclasses.replace(placed, payload=again)
        ttnn.synchronize_device(self.device)

    def _host(self, x: torch.Tensor, like: DeviceTensor) -> Any:
        """``x`` as the host ttnn tensor the staging buffer takes: laid out as the backend uploads it."""
        to_host = getattr(self.backend, "host_tensor", None)
        if to_host is not None:
            return to_host(x, like)
        n, c, h, w = x.shape
        rows = x.detach().float().permute(0, 2, 3, 1).reshape(1, 1, n * h * w, c).contiguous()
        return self.ttnn.from_torch(rows, dtype=like.payload.dtype, layout=like.payload.layout)

    def _write(self, host_inputs: dict[fx.Node, torch.Tensor]) -> None:
        """Stage each input in DRAM (queue 1, or 0) and copy it into the L1 input on queue 0."""
        ttnn = self.ttnn
        hosts = {u: self._host(x, self.inputs[u]) for u, x in host_inputs.items()}
        write_queue = INPUT_QUEUE if self.command_queues == 2 else OPS_QUEUE
        if self.command_queues == 2 and self.op_event is not None:
            ttnn.wait_for_event(INPUT_QUEUE, self.op_event)  # the previous input has left the staging buffer
        for upload, host in hosts.items():
            ttnn.copy_host_to_device_tensor(host, self.staging[upload], cq_id=write_queue)
            self.pipeline.converted.transfer_counter.uploads += 1
        if self.command_queues == 2:
            ttnn.wait_for_event(OPS_QUEUE, ttnn.record_event(self.device, INPUT_QUEUE))
        for upload, placed in self.inputs.items():
            if not placed.payload.is_allocated():  # freed by the first layer of the last (untraced) forward
                placed = self.inputs[upload] = dataclasses.replace(
                    placed, payload=ttnn.allocate_tensor_on_device(placed.payload.spec, self.device))
            ttnn.copy(self.staging[upload], placed.payload)
        if self.command_queues == 2:
            self.op_event = ttnn.record_event(self.device, OPS_QUEUE)

    def read(self, value: DeviceTensor) -> Any:
        # on queue 0, after the forward; without blocking where events can say when it is done
        blocking = self.backend.mock
        host = value.payload.cpu(blocking=blocking, cq_id=OPS_QUEUE)
        done = None if blocking else self.ttnn.record_event(self.device, OPS_QUEUE)
        # keep the description only: an untraced forward's output buffer is freed once read
        return dataclasses.replace(value, payload=None), host, done

    def finish(self, read: Any) -> DeviceTensor:
        value, host, done = read
        if done is not None:
            self.ttnn.event_synchronize(done)
        return dataclasses.replace(value, payload=host)

    def close(self) -> None:
        if self.trace_id is not None:
            self.ttnn.release_trace(self.device, self.trace_id)
            self.trace_id = None


def _consumers(pipeline: Pipeline, upload: fx.Node) -> str:
    return ", ".join(_describe(pipeline.gm, u) for u in upload.users)


def _engine_for(pipeline: Pipeline, trace: bool, command_queues: int) -> _Engine:
    """ttnn gets the persistent-buffer engine; every other backend (emulated, golden) the plain steps,
    which give the plain forward's values."""
    if pipeline.converted.backend.name == "ttnn":
        return _TtnnEngine(pipeline, trace, command_queues)
    return _PlainEngine(pipeline)


# -- trace safety, proven without a trace -----------------------------------------------------------
# ttnn functions that move data between host and device, as ttnn's graph capture names them
_HOST_TRANSFER = re.compile(r"to_device|from_device|Tensor::cpu|copy_to_(device|host)|to_torch|from_torch|"
                            r"host_to_device|device_to_host|write_tensor|read_tensor|enqueue_(write|read)")


@dataclass
class TraceSafety:
    """What ttnn's graph capture saw during one forward of a pipeline's device part, after warm-up.

    A trace replays device commands only, so the forward must not move data between host and device,
    must build no program (a program cache miss writes kernel binaries from the host), and must leave no
    buffer allocated but its outputs (the persistent input is allocated before it)."""

    host_transfers: list[tuple[str, str]] = field(default_factory=list)  # (layer, ttnn function)
    cache_misses: list[tuple[str, str]] = field(default_factory=list)  # (layer, device operation)
    kept_buffers: list[tuple[str, str, int]] = field(default_factory=list)  # (layer, L1/DRAM, address): not outputs
    programs: int = 0  # programs the forward dispatched
    outputs: int = 0  # buffers left allocated that are the forward's outputs

    @property
    def ok(self) -> bool:
        return not (self.host_transfers or self.cache_misses or self.kept_buffers)

    def summary(self) -> str:
        if self.ok:
            return (f"traceable: {self.programs} programs, no host transfer, no program built, "
                    f"no buffer kept but the {self.outputs} output(s)")
        problems = [f"{layer}: host transfer {name}" for layer, name in self.host_transfers]
        problems += [f"{layer}: program cache miss in {name}" for layer, name in self.cache_misses]
        problems += [f"{layer}: {kind} buffer at {address} outlives the forward" for layer, kind, address in
                     self.kept_buffers]
        return "not traceable:\n  " + "\n  ".join(problems)


def trace_safety(pipe: Pipeline, x: torch.Tensor | Sequence[torch.Tensor]) -> TraceSafety:
    """Run ``x`` through ``pipe``'s device part (ttnn backend; the pipeline is compiled on ``x`` first if
    it has not run yet) with ttnn's graph capture around each device layer, and report what would stop
    a trace. This is how trace-safety is checked in mock mode, where no trace can be captured."""
    import ttnn

    engine = pipe._engine
    if not isinstance(engine, _TtnnEngine):
        raise TypeError(f"trace_safety needs a model converted with backend='ttnn', not {pipe.converted.backend.name!r}")
    inputs = (x,) if isinstance(x, torch.Tensor) else tuple(x)
    if not engine.inputs:
        pipe(inputs if len(inputs) > 1 else inputs[0])
    env: dict[fx.Node, Any] = dict(zip(pipe._placeholders, inputs))
    _run(pipe.gm, [n for n in pipe.stages.head if n.op != "placeholder"], env, {})
    engine._write({u: fx.node.map_arg(u.args[0], lambda n: env[n]) for u in pipe.stages.uploads})
    result = TraceSafety()
    live: dict[tuple[int, int, int], str] = {}  # (device, buffer type, address) -> the layer that allocated it
    outputs = pipe.run_device(engine.inputs, around=lambda node: _captured(pipe, node, result, live))
    output_addresses = {t.payload.buffer_address() for t in outputs.values()}
    for (_, buffer_type, address), layer in live.items():
        if address in output_addresses:
            result.outputs += 1
        else:
            kind = "DRAM" if buffer_type == ttnn.BufferType.DRAM.value else "L1"
            result.kept_buffers.append((layer, kind, address))
    return result


@contextlib.contextmanager
def _captured(pipe: Pipeline, node: fx.Node, result: TraceSafety, live: dict) -> Iterator[None]:
    """One device layer (its call and the freeing of the values it read last) in a graph capture."""
    import ttnn

    layer = pipe.gm.get_submodule(node.target).layer
    ttnn.graph.begin_graph_capture(ttnn.graph.RunMode.NORMAL)
    try:
        yield
    finally:
        graph = ttnn.graph.end_graph_capture()
    for entry in graph:
        kind, params = entry["node_type"], entry.get("params") or {}
        if kind == "function_start":
            name = str(params.get("name", ""))
            if _HOST_TRANSFER.search(name):
                result.host_transfers.append((layer, name))
            if str(params.get("program_cache_hit", "1")).lower() in ("0", "false"):
                result.cache_misses.append((layer, name))
        elif kind == "program_execution":
            result.programs += 1
        elif kind in ("buffer_allocate", "buffer_deallocate"):
            key = (int(params.get("device_id", 0)), int(params["buffer_type"]), int(params["address"]))
            if kind == "buffer_allocate":
                live[key] = layer
            else:
                live.pop(key, None)
