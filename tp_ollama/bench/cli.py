"""`tp-ollama bench ...`: parses and calls. Every command prints the report as markdown and, with
--out PATH.json, writes the JSON (schema: `tp-ollama bench schema`), the markdown and PNG plots."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

bench_app = typer.Typer(
    name="bench",
    help="Measure the engine, servers and collectives; compare against other engines; predict TP speed.",
    no_args_is_help=True,
)

OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Write the report here (.json) with its .md and PNG plots beside it.")
]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar on stderr.")]
RoundsOpt = Annotated[int, typer.Option(help="Alternating rounds; medians are reported, every round is kept.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]
NnodesOpt = Annotated[int, typer.Option(help="Machines taking part (run the same command on each).")]
NodeRankOpt = Annotated[int, typer.Option(help="This machine's index, 0 for the first.")]
MasterAddrOpt = Annotated[str, typer.Option(help="Address of node 0 (the rendezvous).")]
MasterPortOpt = Annotated[int, typer.Option(help="Rendezvous port on node 0 (0: any, one node only).")]


def split_list(value: str, what: str, kind: Callable[[str], Any] = str) -> list[Any]:
    """`1,2,4` -> [1, 2, 4]; a bad item is an error naming it."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise typer.BadParameter(f"{what} {value!r} is empty: expected a comma-separated list")
    try:
        return [kind(v) for v in items]
    except ValueError:
        raise typer.BadParameter(f"{what} {value!r} is invalid: expected a comma-separated list of numbers") from None


def load_report(path: Path, kind: str) -> dict[str, Any]:
    """An earlier report of this kind, checked."""
    from tp_ollama.bench import schema as bench_schema
    from tp_ollama.errors import ConfigError

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable bench report ({e})") from None
    bench_schema.validate(data)
    if data["kind"] != kind:
        raise ConfigError(f"{path}: a {data['kind']} report, expected a {kind} report")
    return data


def emit(report: dict[str, Any] | None, out: Path | None) -> None:
    from tp_ollama.bench import report as rpt
    from tp_ollama.bench import schema as bench_schema

    if report is None:  # a node other than 0: rank 0's node reports
        return
    bench_schema.validate(report)
    typer.echo(rpt.to_markdown(report))
    if out is not None:
        for path in rpt.write(report, out):
            typer.echo(f"wrote {path}", err=True)


def run(debug: bool, fn: Callable[[], Any]) -> None:
    from tp_ollama.cli_support import run_reporting_errors

    run_reporting_errors(debug, fn)


@bench_app.command()
def decode(
    model: Annotated[str, typer.Argument(help="gemma3:270m, smollm2:135m, a GGUF file or an HF directory.")],
    tp: Annotated[str, typer.Option(help="TP degrees, e.g. 1,2,3.")] = "1",
    pp: Annotated[str, typer.Option(help="Pipeline stages, e.g. 1,2 (ranks = tp x pp).")] = "1",
    dtype: Annotated[str, typer.Option(help="Activation dtypes, e.g. auto,float32.")] = "auto",
    quant: Annotated[str, typer.Option(help="Weight packings, e.g. auto,none,int8,int4.")] = "auto",
    prompt_tokens: Annotated[str, typer.Option(help="Prompt lengths in tokens.")] = "32",
    gen_tokens: Annotated[str, typer.Option(help="Generated tokens per run.")] = "64",
    comm: Annotated[str, typer.Option(help="Collectives: auto, shm, tcp, gloo.")] = "auto",
    streams: Annotated[int, typer.Option(help="Also run this many requests decoding together (aggregate tok/s).")] = 1,
    rounds: RoundsOpt = 1,
    nnodes: NnodesOpt = 1,
    node_rank: NodeRankOpt = 0,
    master_addr: MasterAddrOpt = "127.0.0.1",
    master_port: MasterPortOpt = 0,
    calibration: Annotated[
        Path | None, typer.Option(help="A decode report whose TP=1 runs calibrate the cost model's predictions.")
    ] = None,
    ranks_per_host: Annotated[
        int | None, typer.Option(help="Ranks sharing one memory bus, for the predictions (default: per node).")
    ] = None,
    out: OutOpt = None,
    progress: ProgressOpt = True,
    debug: DebugOpt = False,
) -> None:
    """The engine in fresh processes over TP degrees, dtypes, packings, prompt and generation lengths:
    decode and prompt tok/s, TTFT, load time, per-rank RSS and bandwidth, compute vs communication."""

    def body() -> None:
        from tp_ollama.bench.decode import Nodes, run_decode

        report = run_decode(
            model,
            tp=split_list(tp, "--tp", int),
            pp=split_list(pp, "--pp", int),
            streams=streams,
            dtypes=split_list(dtype, "--dtype"),
            quants=split_list(quant, "--quant"),
            prompt_tokens=split_list(prompt_tokens, "--prompt-tokens", int),
            gen_tokens=split_list(gen_tokens, "--gen-tokens", int),
            rounds=rounds,
            comm=comm,
            nodes=Nodes(nnodes, node_rank, master_addr, master_port),
            calibration=load_report(calibration, "decode") if calibration else None,
            ranks_per_host=ranks_per_host,
            progress=progress,
            argv=sys.argv,
        )
        emit(report, out)

    run(debug, body)


@bench_app.command()
def serve(
    target: Annotated[
        list[str], typer.Option(help="[LABEL@]KIND=URL, KIND one of ollama, llamacpp, openai (repeatable).")
    ],
    model: Annotated[str, typer.Option(help="The model name sent in each request.")] = "gemma3:270m",
    concurrency: Annotated[str, typer.Option(help="Concurrent streams, e.g. 1,4,8,16.")] = "1,4,8,16",
    duration: Annotated[float, typer.Option(help="Seconds of load per level.")] = 30.0,
    num_predict: Annotated[int, typer.Option(help="Tokens per request.")] = 64,
    prompts: Annotated[Path | None, typer.Option(help="Prompt file: one per line, or a JSON list.")] = None,
    request_timeout: Annotated[float, typer.Option(help="A request slower than this counts as a timeout.")] = 120.0,
    rounds: RoundsOpt = 1,
    out: OutOpt = None,
    progress: ProgressOpt = True,
    debug: DebugOpt = False,
) -> None:
    """HTTP load against Ollama-API servers (ours, Ollama, llama.cpp's server) at given concurrencies:
    aggregate tok/s, TTFT and inter-token latency p50/p99, errors and timeouts counted."""

    def body() -> None:
        from tp_ollama.bench.serve import load_prompts, run_serve
        from tp_ollama.bench.serve_targets import parse_target

        report = run_serve(
            [parse_target(t, model) for t in target],
            split_list(concurrency, "--concurrency", int),
            duration,
            num_predict,
            prompts=load_prompts(prompts) if prompts else None,
            request_timeout_s=request_timeout,
            rounds=rounds,
            progress=progress,
            argv=sys.argv,
        )
        emit(report, out)

    run(debug, body)


@bench_app.command()
def compare(
    model: Annotated[str, typer.Argument(help="The model every engine target loads (name or path).")],
    target: Annotated[
        list[str],
        typer.Option(
            help="[LABEL@]tp-ollama[:tp=N,quant=Q,dtype=D,comm=C], transformers[:dtype=D], llama.cpp; "
            "with --serve: KIND=URL (repeatable)."
        ),
    ],
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 32,
    gen_tokens: Annotated[int, typer.Option(help="Generated tokens per run.")] = 64,
    threads: Annotated[int | None, typer.Option(help="CPU threads per target in all (default: every CPU).")] = None,
    cold_start: Annotated[bool, typer.Option(help="Also time process start to first token.")] = False,
    serve_mode: Annotated[bool, typer.Option("--serve", help="Compare running servers under HTTP load.")] = False,
    concurrency: Annotated[str, typer.Option(help="With --serve: concurrent streams.")] = "1,4,8,16",
    duration: Annotated[float, typer.Option(help="With --serve: seconds of load per level.")] = 30.0,
    num_predict: Annotated[int, typer.Option(help="With --serve: tokens per request.")] = 64,
    rounds: RoundsOpt = 3,
    out: OutOpt = None,
    progress: ProgressOpt = True,
    debug: DebugOpt = False,
) -> None:
    """Several targets in one run, alternating round by round, with ratios pair by pair."""

    def body() -> None:
        from tp_ollama.bench.compare import run_compare, run_compare_serve

        if serve_mode:
            report = run_compare_serve(
                model, target, split_list(concurrency, "--concurrency", int), duration, num_predict, rounds,
                progress=progress, argv=sys.argv,
            )  # fmt: skip
        else:
            report = run_compare(
                model, target, prompt_tokens, gen_tokens, threads, rounds, cold_start, progress=progress, argv=sys.argv
            )
        emit(report, out)

    run(debug, body)


@bench_app.command()
def quality(
    model: Annotated[
        str, typer.Argument(help="The model (name or path); its float32 dequantization is the reference.")
    ],
    setting: Annotated[
        list[str] | None,
        typer.Option(
            help="QUANT/DTYPE to measure (repeatable); default: auto/auto, int8/auto, int4/auto, auto/bfloat16."
        ),
    ] = None,
    llama_cpp: Annotated[
        bool, typer.Option("--llama-cpp/--no-llama-cpp", help="Also measure llama.cpp on a GGUF.")
    ] = True,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: every CPU).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Score only the text's first N tokens (a quick look).")] = None,
    out: OutOpt = None,
    progress: ProgressOpt = True,
    debug: DebugOpt = False,
) -> None:
    """Top-1 agreement, KL divergence and perplexity of each precision setting against float32."""

    def body() -> None:
        from tp_ollama.bench.quality import DEFAULT_SETTINGS, run_quality

        say = (lambda line: typer.echo(line, err=True)) if progress else None
        report = run_quality(model, setting or DEFAULT_SETTINGS, llama_cpp, threads, max_tokens, argv=sys.argv,
                             progress=say)  # fmt: skip
        emit(report, out)

    run(debug, body)


@bench_app.command()
def collectives(
    backend: Annotated[str, typer.Option(help="Communicators: shm, tcp, gloo.")] = "shm,tcp,gloo",
    size: Annotated[str, typer.Option(help="Message sizes in bytes.")] = "64,2560,65536,1048576",
    nproc_per_node: Annotated[int, typer.Option(help="Ranks on this machine.")] = 2,
    iters: Annotated[int | None, typer.Option(help="Calls per size (default: by size).")] = None,
    nnodes: NnodesOpt = 1,
    node_rank: NodeRankOpt = 0,
    master_addr: MasterAddrOpt = "127.0.0.1",
    master_port: MasterPortOpt = 0,
    out: OutOpt = None,
    progress: ProgressOpt = True,
    debug: DebugOpt = False,
) -> None:
    """All-reduce and broadcast latency and bandwidth per communicator and message size, across local
    ranks or (with --nnodes) machines; the link's latency and bandwidth as measured."""

    def body() -> None:
        from tp_ollama.bench.collectives import run_collectives

        report = run_collectives(
            split_list(backend, "--backend"),
            split_list(size, "--size", int),
            world=nproc_per_node,
            nnodes=nnodes,
            node_rank=node_rank,
            master_addr=master_addr,
            master_port=master_port,
            iters=iters,
            progress=progress,
            argv=sys.argv,
        )
        emit(report, out)

    run(debug, body)


@bench_app.command()
def schema() -> None:
    """Print the JSON Schema of a bench report (every field with its unit)."""
    from tp_ollama.bench.schema import SCHEMA

    typer.echo(json.dumps(SCHEMA, indent=2))


@bench_app.command("random-model")
def random_model(
    shape: Annotated[str, typer.Argument(help="A known shape: gemma3-270m, smollm2-135m, llama3.2-1b, llama3-8b.")],
    directory: Annotated[Path, typer.Argument(help="Where to write config.json and model.safetensors.")],
    layers: Annotated[int | None, typer.Option(help="Keep this many layers (a big shape on a small machine).")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "bfloat16",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    debug: DebugOpt = False,
) -> None:
    """Write a checkpoint of random weights in the shape of a real model, for timing (no download)."""

    def body() -> None:
        from tp_ollama.bench.random_model import write_random_model
        from tp_ollama.parallel.shapes import shape_named

        typer.echo(write_random_model(shape_named(shape), directory, dtype=dtype, layers=layers, seed=seed))

    run(debug, body)


@bench_app.command()
def predict(
    model: Annotated[str, typer.Argument(help="A known shape (llama3-8b, ...), a model name or a path.")],
    tp: Annotated[str, typer.Option(help="TP degrees to predict, e.g. 1,2,4.")] = "1,2,4",
    latency_us: Annotated[float, typer.Option(help="Link latency per collective, µs.")] = 100.0,
    bandwidth_gbs: Annotated[float, typer.Option(help="The link's bandwidth, GB/s (1 Gbit/s = 0.125).")] = 0.125,
    read_bandwidth_gbs: Annotated[float, typer.Option(help="Each host's read bandwidth, GB/s.")] = 25.0,
    efficiency: Annotated[float, typer.Option(help="Share of it decode reaches (bench decode).")] = 0.5,
    quant: Annotated[str, typer.Option(help="none, int8 or int4.")] = "int4",
    dtype: Annotated[str, typer.Option(help="Activations: float32 or bfloat16.")] = "bfloat16",
    ranks_per_host: Annotated[int, typer.Option(help="Ranks sharing one host's memory bus.")] = 1,
    debug: DebugOpt = False,
) -> None:
    """The cost model's decode tok/s for a shape over a link at several TP degrees: when more nodes help."""

    def body() -> None:
        from tp_ollama.parallel.costmodel import Calibration, Link, preflight_warning
        from tp_ollama.parallel.costmodel import predict as predict_tp
        from tp_ollama.parallel.shapes import SHAPES, shape_named, shape_of

        if model in SHAPES:
            shape = shape_named(model)
        else:
            from tp_ollama.checkpoints.loader import open_checkpoint
            from tp_ollama.errors import ConfigError, TpOllamaError
            from tp_ollama.store.embedded import resolve_model

            try:
                path = resolve_model(model)
            except TpOllamaError as e:
                raise ConfigError(f"{model!r} is not a known shape ({', '.join(SHAPES)}) and {e}") from None
            ckpt = open_checkpoint(path)
            shape = shape_of(ckpt.config)
            ckpt.close()
        link = Link.from_us_gbs(latency_us, bandwidth_gbs)
        calibration = Calibration(read_bandwidth_gbs * 1e9, efficiency)
        degrees = split_list(tp, "--tp", int)
        one = predict_tp(shape, 1, link, calibration, quant, dtype)
        typer.echo(f"{model}: {shape.parameters() / 1e9:.2f} B parameters, {quant} weights, {dtype} activations, "
                   f"link {link.describe()}, {read_bandwidth_gbs:g} GB/s x {efficiency:g} per host\n")  # fmt: skip
        typer.echo("| TP | tok/s | vs TP=1 | compute ms | communication ms | MB read per rank |")
        typer.echo("|---|---|---|---|---|---|")
        for n in degrees:
            p = predict_tp(shape, n, link, calibration, quant, dtype, ranks_per_host=min(ranks_per_host, n))
            mb = " / ".join(f"{b / 1e6:.0f}" for b in p.bytes_per_token())
            typer.echo(f"| {n} | {p.tok_s:.1f} | {p.tok_s / one.tok_s:.2f}x | {p.compute_s * 1e3:.2f} | "
                       f"{p.communication_s * 1e3:.2f} | {mb} |")  # fmt: skip
            warning = preflight_warning(one, p)
            if warning:
                typer.echo(f"\nWarning: {warning}", err=True)

    run(debug, body)
