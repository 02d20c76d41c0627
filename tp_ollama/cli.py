"""The tp-ollama command line. It parses and calls; nothing heavy is imported until a command runs."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from tp_ollama import __version__
from tp_ollama.bench.cli import bench_app
from tp_ollama.cli_support import run_reporting_errors
from tp_ollama.client.commands import register as register_client_commands

app = typer.Typer(
    name="tp-ollama",
    help="An Ollama-compatible LLM server whose model is split across processes, GPUs or machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]
LogLevelOpt = Annotated[
    str | None,
    typer.Option(help="debug, info, warning or error (default: TP_OLLAMA_LOG_LEVEL, OLLAMA_DEBUG=1, else info)."),
]


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


# Options shared by generate and launch.
ModelArg = Annotated[str, typer.Argument(help="gemma3:270m, smollm2:135m, a GGUF file or an HF directory.")]
ChatOpt = Annotated[bool, typer.Option("--chat", help="Send the prompt as a user message.")]
SystemOpt = Annotated[str | None, typer.Option(help="System message (with --chat).")]
TemperatureOpt = Annotated[float, typer.Option(help="0 is greedy.")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")]
NumPredictOpt = Annotated[int, typer.Option(help="Maximum tokens to generate (-1: until EOS).")]
TopKOpt = Annotated[int, typer.Option(help="Keep the k most likely tokens (0: off).")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling threshold (1: off).")]
MinPOpt = Annotated[float, typer.Option(help="Drop tokens below min_p x the top probability.")]
RepeatPenaltyOpt = Annotated[float, typer.Option(help="Penalty for recent tokens (1: off).")]
RepeatLastNOpt = Annotated[int, typer.Option(help="How many recent tokens the penalties see.")]
StopOpt = Annotated[list[str] | None, typer.Option(help="Stop string; repeat for several.")]
NumCtxOpt = Annotated[int, typer.Option(help="Context window in tokens.")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="Activations: auto (float32 with quantized weights, else the file's 16-bit floats where the CPU "
        "has them), float32, bfloat16."
    ),
]
QuantOpt = Annotated[
    str, typer.Option(help="Weights: auto (the file's own precision), none (dequantized), int8, int4.")
]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda (ranks share GPUs round-robin).")]
TpWeightsOpt = Annotated[
    str | None, typer.Option(help="Relative speed of each rank, e.g. 2,1,1: a bigger share for faster ranks.")
]
PpOpt = Annotated[int, typer.Option(help="Pipeline stages: each holds a contiguous range of layers (ranks = tp x pp).")]
StrategyOpt = Annotated[
    str | None,
    typer.Option(
        help="How ranks split the model: tensor, layerwise (stages), hybrid (TP inside stages, one per node "
        "by default), auto (the cost model's pick at load)."
    ),
]
MemoryBudgetOpt = Annotated[
    str | None, typer.Option(help="The most weight bytes one rank may hold, e.g. 8GB (a bigger part fails its load).")
]
PpWeightsOpt = Annotated[
    str | None, typer.Option(help="Relative speed of each pipeline stage, e.g. 2,1: more layers for faster stages.")
]
CommOpt = Annotated[str, typer.Option(help="Collectives: auto (shared memory / sockets), shm, tcp, gloo, nccl.")]
JoinTimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for every rank and node to join.")]


@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="The prompt (completed as is unless --chat).")],
    chat: ChatOpt = False,
    system: SystemOpt = None,
    temperature: TemperatureOpt = 0.8,
    seed: SeedOpt = None,
    num_predict: NumPredictOpt = -1,
    top_k: TopKOpt = 40,
    top_p: TopPOpt = 0.9,
    min_p: MinPOpt = 0.0,
    repeat_penalty: RepeatPenaltyOpt = 1.0,
    repeat_last_n: RepeatLastNOpt = 64,
    stop: StopOpt = None,
    num_ctx: NumCtxOpt = 4096,
    dtype: DtypeOpt = "auto",
    quant: QuantOpt = "auto",
    device: DeviceOpt = "cpu",
    verbose: Annotated[bool, typer.Option("--verbose", help="Print timings and token rates afterwards.")] = False,
    tp: Annotated[int, typer.Option(help="Tensor-parallel ranks on this machine.")] = 1,
    tp_weights: TpWeightsOpt = None,
    pp: PpOpt = 1,
    pp_weights: PpWeightsOpt = None,
    strategy: StrategyOpt = None,
    memory_budget: MemoryBudgetOpt = None,
    comm: CommOpt = "auto",
    join_timeout: JoinTimeoutOpt = 120.0,
    debug: DebugOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """Generate text for one prompt and write only the generated text to stdout."""

    def body() -> None:
        from tp_ollama.launch import Cluster
        from tp_ollama.oneshot import Prompting, generate_in_process, generate_on_ranks, sampling_options

        options = sampling_options(
            temperature=temperature,
            seed=seed,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            repeat_last_n=repeat_last_n,
            num_predict=num_predict,
            num_ctx=num_ctx,
            stop=stop,
        )
        from tp_ollama.config.values import parse_size

        budget = parse_size(memory_budget) if memory_budget else 0
        req = Prompting(model, prompt, chat, system, options, dtype, device, quant, verbose, budget)
        if tp == 1 and pp == 1 and not tp_weights:
            generate_in_process(req)
        else:
            cluster = Cluster(nproc_per_node=tp * pp, join_timeout_s=join_timeout)
            generate_on_ranks(req, cluster, tp_weights, comm, debug, pp, pp_weights, strategy or "tensor")
        if sys.stdout.isatty():  # keep the shell prompt off the last line; pipes get the text exactly
            sys.stdout.write("\n")

    # Like `ollama run`, the answer alone unless a level is asked for: warnings and errors only.
    run_reporting_errors(debug, body, log_level, default_level="warning")


@app.command()
def launch(
    model: Annotated[
        str | None, typer.Argument(help="With PROMPT: the model for a one-shot generation (no server).")
    ] = None,
    prompt: Annotated[str | None, typer.Argument(help="Generate once instead of serving.")] = None,
    config: Annotated[str | None, typer.Option(help="A config.yaml (see configs/default.yaml).")] = None,
    host: Annotated[str | None, typer.Option(help="Node 0: address the server listens on.")] = None,
    port: Annotated[int | None, typer.Option(help="Node 0: port the server listens on.")] = None,
    nnodes: Annotated[int, typer.Option(help="Number of machines.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This machine's index, 0 for the first.")] = 0,
    nproc_per_node: Annotated[int, typer.Option(help="Engine ranks on this machine.")] = 1,
    master_addr: Annotated[str, typer.Option(help="Address of node 0 (the rendezvous).")] = "127.0.0.1",
    master_port: Annotated[int, typer.Option(help="Rendezvous port on node 0.")] = 29511,  # DEFAULT_MASTER_PORT
    bootstrap: Annotated[
        str | None, typer.Option(help="Node 0 as HOST:PORT or /ip4/A.B.C.D/tcp/PORT (sets addr and port).")
    ] = None,
    chat: ChatOpt = False,
    system: SystemOpt = None,
    temperature: TemperatureOpt = 0.8,
    seed: SeedOpt = None,
    num_predict: NumPredictOpt = -1,
    top_k: TopKOpt = 40,
    top_p: TopPOpt = 0.9,
    num_ctx: NumCtxOpt = 4096,
    stop: StopOpt = None,
    dtype: DtypeOpt = "auto",
    quant: QuantOpt = "auto",
    device: DeviceOpt = "cpu",
    tp_weights: TpWeightsOpt = None,
    pp: PpOpt = 1,
    pp_weights: PpWeightsOpt = None,
    strategy: StrategyOpt = None,
    comm: CommOpt = "auto",
    join_timeout: JoinTimeoutOpt = 120.0,
    debug: DebugOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """Run one tensor-parallel group across machines: the same command on every node. Node 0 serves the
    Ollama API (or, given MODEL and PROMPT, generates once); the other nodes run engine ranks only."""

    def body() -> None:
        from tp_ollama.launch import Cluster, parse_bootstrap
        from tp_ollama.oneshot import Prompting, generate_on_ranks, sampling_options
        from tp_ollama.server.serve import serve_cluster

        addr, rdzv_port = parse_bootstrap(bootstrap) if bootstrap else (master_addr, master_port)
        cluster = Cluster(nnodes, node_rank, nproc_per_node, addr, rdzv_port, join_timeout)
        if prompt is None:
            serve_cluster(cluster, config, host, port, tp_weights, comm, device, dtype, quant, num_ctx, debug, pp,
                          pp_weights, strategy)  # fmt: skip
            return
        if model is None:
            raise typer.BadParameter("a PROMPT needs a MODEL")
        options = sampling_options(
            temperature=temperature,
            seed=seed,
            top_k=top_k,
            top_p=top_p,
            num_predict=num_predict,
            num_ctx=num_ctx,
            stop=stop,
        )
        req = Prompting(model, prompt, chat, system, options, dtype, device, quant)
        generate_on_ranks(req, cluster, tp_weights, comm, debug, pp, pp_weights, strategy or "tensor")
        if node_rank == 0 and sys.stdout.isatty():
            sys.stdout.write("\n")

    run_reporting_errors(debug, body, log_level)


@app.command()
def serve(
    config: Annotated[str | None, typer.Option(help="A config.yaml (see configs/default.yaml).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (OLLAMA_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    tp: Annotated[int | None, typer.Option(help="Tensor-parallel ranks on this machine.")] = None,
    tp_weights: TpWeightsOpt = None,
    pp: Annotated[int | None, PpOpt.__metadata__[0]] = None,
    pp_weights: PpWeightsOpt = None,
    strategy: StrategyOpt = None,
    memory_budget: MemoryBudgetOpt = None,
    comm: Annotated[str | None, typer.Option(help="Collectives: auto, shm, tcp, gloo, nccl.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Activations: auto, float32, bfloat16.")] = None,
    quant: Annotated[str | None, typer.Option(help="Weights: none, int8, int4, auto (a GGUF's own precision).")] = None,
    num_ctx: Annotated[int | None, typer.Option(help="Default context window.")] = None,
    keep_alive: Annotated[str | None, typer.Option(help="How long an idle model stays loaded (5m, -1).")] = None,
    models: Annotated[str | None, typer.Option(help="Model store directory (OLLAMA_MODELS).")] = None,
    extra_stores: Annotated[
        str | None, typer.Option(help="Other Ollama stores to read in place, comma-separated (e.g. ~/.ollama/models).")
    ] = None,
    replicas: Annotated[
        int | None, typer.Option(help="Engine groups of --tp ranks each, every one holding the whole model.")
    ] = None,
    load_balancing: Annotated[
        str | None, typer.Option(help="How requests are spread over replicas: least_loaded or round_robin.")
    ] = None,
    num_parallel: Annotated[
        int | None, typer.Option(help="Requests generating at once per replica (OLLAMA_NUM_PARALLEL).")
    ] = None,
    max_queue: Annotated[
        int | None, typer.Option(help="Requests allowed to wait; one more gets 503 (OLLAMA_MAX_QUEUE).")
    ] = None,
    debug: DebugOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """Start the Ollama-compatible server with --replicas engine groups (default 1) of --tp ranks."""

    def body() -> None:
        from pathlib import Path

        from tp_ollama.config.loading import load_settings
        from tp_ollama.server.serve import run

        ranks = (tp or 1) * pp if pp is not None and pp > 1 else tp  # tp ranks in each of pp stages
        flags = {
            "host": host, "port": port, "tp": ranks, "tp_weights": tp_weights, "pp": pp, "pp_weights": pp_weights,
            "strategy": strategy, "memory_budget": memory_budget,
            "comm": comm, "device": device,
            "dtype": dtype, "quant": quant, "num_ctx": num_ctx, "keep_alive": keep_alive, "models": models,
            "extra_stores": extra_stores,
            "replicas": replicas, "load_balancing": load_balancing, "num_parallel": num_parallel,
            "max_queue": max_queue,
        }  # fmt: skip
        settings = load_settings(Path(config) if config else None, os.environ, flags)
        run(settings, debug)

    run_reporting_errors(debug, body, log_level)


@app.command(hidden=True)
def engine(
    debug: DebugOpt = False,
    log_level: LogLevelOpt = None,
) -> None:
    """Run one node's ranks of an engine group (for serve and launch): import what a rank needs, then
    run the group the first line of stdin describes (tp_ollama.engine.host.GroupSpec, JSON)."""

    def body() -> int:
        from tp_ollama.engine.host import standby
        from tp_ollama.membership.files import connect

        return standby(connect)

    code = run_reporting_errors(debug, body, log_level)
    if code:
        raise typer.Exit(code)


# Ollama's client commands (run, list, ps, show, rm, cp, create, stop), talking to a server over HTTP.
register_client_commands(app)
app.add_typer(bench_app, name="bench")


# One-shot commands whose process has nothing left to release once their output is written: the
# interpreter's own teardown with torch loaded takes ~0.5 s, a sixth of generate's cold start.
EXIT_WITHOUT_TEARDOWN = frozenset({"generate"})


def main() -> None:
    try:
        app()
    except SystemExit as e:
        if e.code in (0, None) and sys.argv[1:2] and sys.argv[1] in EXIT_WITHOUT_TEARDOWN:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        raise
