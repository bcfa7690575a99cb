"""``seeright`` command line: serve, generate, eval (POPE, CHAIR, shapes, lmms-eval), score (existing prediction files),
bench, loadtest, results (render the docs' tables from records). The top of the house: it imports every room."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from seeright.eval import chair, pope
from seeright.interventions.registry import MethodRegistry
from seeright.testbed import world as shapes

BENCH_MODEL = "bench-random/llava"
_METHODS_HELP = "a method and its parameters (repeatable); methods: " + ", ".join(MethodRegistry.builtin())


def _parse_intervention(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:k=v,k=v`` (values parsed as JSON when possible) -> (name, params)."""
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return name, params


def _record(args: argparse.Namespace, kind: str, name: str, values: object) -> None:
    """Keep a measurement as a record under ``--results`` (``seeright.tools.records``), unless ``--no-record``."""
    if getattr(args, "no_record", False):
        return
    from seeright.tools import records

    path = records.write(kind, name, values, sys.argv[1:] if args.argv is None else args.argv, args.results)
    print(f"record: {path}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from seeright.service.api.app import create_app
    from seeright.service.settings import Settings

    settings = Settings.load(
        args.config, model=args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
        api_key_file=args.api_key_file, metrics_require_key=args.protect_metrics or None,
        allowed_image_dir=args.allowed_image_dir,
        allow_remote_urls=True if args.allow_remote_urls else None, engine=args.engine,
        vllm_max_model_len=args.max_model_len, adapters=_adapters(args.adapter),
        runtime_adapters=True if args.runtime_adapters else None,
    )
    if args.replicas > 1 or args.ray_address:
        from seeright.service.scale_out import serve_replicas  # the [ray] extra

        gpus = args.replica_gpus if args.replica_gpus is not None else float(settings.device.startswith("cuda"))
        serve_replicas(settings, args.replicas, args.ray_address, args.replica_cpus, gpus)
        return 0
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, timeout_graceful_shutdown=60)
    return 0


def _adapters(given: list[str]) -> dict[str, str] | None:
    """``--adapter NAME=PATH`` flags as a name -> folder table (None when none is given: the YAML file's stand)."""
    table = {}
    for item in given:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--adapter {item!r}: expected NAME=PATH")
        table[name] = path
    return table or None


def cmd_export(args: argparse.Namespace) -> int:
    """Save a model as a folder both engines load (the vision tower in the hub layout vLLM reads)."""
    from seeright.service.engine import Engine

    Engine.from_pretrained(args.model, dtype=args.dtype).save_pretrained(args.folder)
    print(args.folder)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from seeright.service.engine import Engine

    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    images = [Image.open(p) for p in args.image]
    interventions = dict(_parse_intervention(s) for s in args.intervention)
    out = engine.generate(args.prompt, images=images, interventions=interventions, max_new_tokens=args.max_new_tokens)
    print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason, "timings": out.timings}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seeright.eval import report, runner

    if args.endpoint:
        from seeright.eval.http_client import HttpGenerator

        generator = HttpGenerator(args.endpoint, args.model, api_key=args.api_key)
    else:
        from seeright.service.engine import Engine, EngineGenerator

        generator = EngineGenerator(Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype))
    spec = runner.BenchmarkSpec(
        benchmark=args.benchmark, images=Path(args.images), limit=args.limit, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        **(
            {"splits": tuple(args.split), "prompt": args.prompt, "questions": Path(args.questions) if args.questions else None,
             "dataset": Path(args.dataset) if args.dataset else None}
            if args.benchmark == "pope" else {"gt": Path(args.gt) if args.gt else None, "lemmatizer": args.lemmatizer}
        ),
    )
    out_dir = Path(args.out)
    methods = {"baseline": {}} | {spec_: dict([_parse_intervention(spec_)]) for spec_ in args.intervention}
    results = {}
    for label, interventions in methods.items():
        safe = label.replace(":", "_").replace(",", "_").replace("=", "-")
        results[label] = runner.run_benchmark(spec, generator, out_dir / safe / f"{args.benchmark}.jsonl", interventions)
    report.write_report(out_dir, args.benchmark, results)
    print(json.dumps(results, indent=2))
    return 0


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    with _shapes_generator(args) as (engine, generator):
        return _eval_shapes(args, engine, generator)


@contextmanager
def _shapes_generator(args: argparse.Namespace) -> Iterator[tuple[Any, Any]]:
    """The engine whose methods and model config make the rows, and the generator that runs them (the transformers
    engine in process, or a vLLM engine client started for the run)."""
    if args.engine == "vllm":
        from seeright.service.settings import Settings
        from seeright.service.vllm.generator import VllmGenerator

        settings = Settings(model=args.model, engine="vllm", dtype=args.dtype, adapters=_adapters(args.adapter) or {},
                            vllm_max_model_len=args.max_model_len)
        with VllmGenerator.started(settings) as generator:
            yield generator.client.spec, generator
        return
    from seeright.service.engine import Engine, EngineGenerator

    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, loras=_adapters(args.adapter))
    yield engine, EngineGenerator(engine)


def _eval_shapes(args: argparse.Namespace, engine: Any, generator: Any) -> int:
    from seeright.testbed import results as shapes_results

    rows = shapes_results.configs(engine.methods, engine.model_config.sweeps)
    if args.only:
        unknown = sorted(set(args.only) - {label for label, _ in rows})
        if unknown:
            raise ValueError(f"only: unknown rows {unknown}; have {[label for label, _ in rows]}")
        rows = tuple(c for c in rows if c[0] in args.only)
    if args.row:  # settings of one's own (a sweep on a development seed): run beside --only's rows, or alone
        extra = tuple(shapes_results.parse_row(label) for label in args.row)
        engine.resolve_params({name: given for _, row in extra for name, given in row.items()})  # a typo fails here
        for label, _ in extra:
            adapter = shapes_results.row_adapter(label)
            if adapter is not None and adapter not in engine.loras:
                raise ValueError(f"row {label!r}: no adapter {adapter!r} (give it with --adapter {adapter}=PATH)")
        rows = (*(rows if args.only else (("baseline", {}),)), *extra)
    if args.engine == "vllm":  # the rows this engine cannot run are left out, each with its reason
        client = generator.client
        for label, row in rows:
            for name, params in row.items():
                if (reason := client.refusal(name, params)) is not None:
                    print(f"row {label!r} left out: {reason}", file=sys.stderr)
        rows = tuple((label, row) for label, row in rows if all(client.refusal(n, p) is None for n, p in row.items()))
    for seed in args.seed:  # several seeds: one folder each
        out = Path(args.out) / f"seed{seed}" if len(args.seed) > 1 else Path(args.out)
        results = shapes_results.run(
            generator, out, seed, args.images, rows, args.batch_size, log=lambda msg: print(msg, file=sys.stderr),
        )
        print(shapes_results.markdown(results))
        chosen = [*(args.only or []), *(args.row or [])]
        rows_run = f" rows {', '.join(chosen)}" if chosen else ""  # a partial table is a record of its own
        engine_name = " on vLLM" if args.engine == "vllm" else ""
        _record(args, "eval-shapes", f"{args.model}{engine_name} seed {seed} {args.images} scenes{rows_run}", results)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from seeright.tools import bench, serving_bench

    if args.serving:
        result = serving_bench.run(args)
        print(json.dumps(result, indent=2))
        _record(args, "bench-serving", args.label or args.model, result)
        return 0
    if args.engine == "vllm":
        from seeright.tools import engine_bench

        model = args.model if args.model != BENCH_MODEL else engine_bench.DEFAULT_MODEL
        result = engine_bench.run(model, args.new_tokens, args.reps, args.block_size)
        print(json.dumps(result, indent=2) if args.json else engine_bench.table(result))
        _record(args, "bench-vllm", model, result)
        return 0

    result = bench.run_bench(
        args.model, args.new_tokens, args.reps, args.warmup, args.device, args.dtype,
        memory=not args.no_memory, reference=not args.no_reference, batch_reps=args.batch_reps,
    )
    print(json.dumps(result, indent=2) if args.json else bench.table(result))
    _record(args, "bench", args.model, result)
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    import asyncio
    from contextlib import nullcontext

    from seeright.service.settings import Settings
    from seeright.tools.loadtest import LoadConfig, local_server, run_load

    if args.hostile:
        return _hostile(args)
    spawn = local_server(Settings(model=args.model, queue_size=args.queue_size, max_batch_size=args.max_batch_size)) if args.spawn else nullcontext(args.url)
    with spawn as url:
        if url is None:
            raise ValueError("url: pass --url of a running server, or --spawn")
        cfg = LoadConfig(url, args.model, args.requests, args.concurrency, args.duration, args.max_tokens, args.stream_every, args.api_key)
        runs = [asyncio.run(run_load(cfg)) for _ in range(args.runs)]
    print(json.dumps(runs if args.runs > 1 else runs[0], indent=2))
    _record(args, "loadtest", args.label or args.model, runs)
    return 0


def _hostile(args: argparse.Namespace) -> int:
    import asyncio
    import socket
    import tempfile
    from contextlib import nullcontext

    from seeright.tools import hostile

    with tempfile.TemporaryDirectory() as images:
        if args.spawn:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            server = hostile.spawned_server(args.model, port, Path(images))
        else:
            server = nullcontext(args.url)
        with server as url:
            if url is None:
                raise ValueError("url: pass --url of a running server, or --spawn")
            rows = asyncio.run(hostile.run(url, args.model, args.api_key))
    print(hostile.table(rows))
    _record(args, "hostile", args.label or args.model, rows)
    return 0


def cmd_lmms_pope(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seeright.tools import lmms_pope

    served = args.model
    models = [served, *(f"{served}+{preset}" for preset in args.preset)]
    rows = lmms_pope.run(args.endpoint, models, args.lmms_python, Path(args.out), args.images, args.seed, args.split,
                         args.concurrency)
    print(json.dumps(rows, indent=2) if args.json else lmms_pope.markdown(rows))
    _record(args, "lmms-pope", served, rows)
    return 0


def cmd_score_pope(args: argparse.Namespace) -> int:
    if args.lmms_samples:
        answers = pope.answers_from_lmms_samples(args.lmms_samples)
    else:
        answers = pope.normalize_answers(pope.read_jsonl(args.answers))
    if args.questions:
        result = pope.score_llava_style(answers, args.labels, args.questions, args.parser)
    else:
        result = pope.score_by_id(answers, args.labels, args.parser)
    result = {"benchmark": "pope", "parser": args.parser, **result}
    print(json.dumps(result, indent=2))
    _record(args, "score", Path(args.lmms_samples or args.answers).name, result)
    return 0


def cmd_score_chair(args: argparse.Namespace) -> int:
    scorer = chair.ChairScorer(lemmatizer=args.lemmatizer)
    if args.coco_instances:
        gt = chair.ground_truth_from_coco(args.coco_instances, args.coco_captions or [], scorer)
    else:
        gt = chair.load_ground_truth(args.gt, variant=args.gt_variant)
    result = {"benchmark": "chair", **scorer.score(chair.read_captions(args.captions), gt, per_caption=args.per_caption)}
    print(json.dumps(result, indent=2))
    _record(args, "score", Path(args.captions).name, result)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from seeright.tools import render

    if args.action == "render":
        for page in render.render(args.docs, args.results):
            print(f"rendered {page}")
        return 0
    stale = render.check(args.docs, args.results)
    for line in stale:
        print(f"differs from its records: {line}", file=sys.stderr)
    return 1 if stale else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seeright", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_serve, _add_generate, _add_eval, _add_bench, _add_loadtest, _add_score, _add_results):
        add(sub)
    return parser


def _add_serve(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server", allow_abbrev=False)
    srv.add_argument("--model", help="model id or folder (default seeright/shapes-smol)")
    srv.add_argument("--config", help="YAML settings file (see configs/server.example.yaml)")
    srv.add_argument("--host")
    srv.add_argument("--port", type=int)
    srv.add_argument("--device")
    srv.add_argument("--dtype")
    srv.add_argument("--api-key-file", help="require a Bearer key from this file (one per line); or SEERIGHT_API_KEYS, "
                     "a JSON list (keys on the command line would show in the process list)")
    srv.add_argument("--protect-metrics", action="store_true", help="GET /metrics needs an API key too")
    srv.add_argument("--allowed-image-dir", help="serve local image paths from this folder only")
    srv.add_argument("--allow-remote-urls", action="store_true", help="fetch http(s) image URLs (public hosts only)")
    srv.add_argument("--engine", choices=["transformers", "vllm"],
                     help="transformers (default: every method) or vllm (the [vllm] extra: the methods its worker hosts)")
    srv.add_argument("--max-model-len", type=int, help="--engine vllm: context length (default: the model's)")
    srv.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                     help="serve the PEFT LoRA adapter folder PATH as model NAME (repeatable)")
    srv.add_argument("--runtime-adapters", action="store_true",
                     help="open POST /v1/load_lora_adapter and /v1/unload_lora_adapter (to admin keys)")
    srv.add_argument("--replicas", type=int, default=1,
                     help="engine replicas on Ray Serve behind one endpoint (needs the [ray] extra; 1: no Ray)")
    srv.add_argument("--ray-address", help="join this Ray cluster (e.g. HEAD:6379) instead of starting a local one")
    srv.add_argument("--replica-cpus", type=float, default=1, help="CPUs Ray reserves per replica (torch threads too)")
    srv.add_argument("--replica-gpus", type=float,
                     help="GPUs Ray reserves per replica (default: 1 when --device is cuda, else 0)")
    srv.set_defaults(func=cmd_serve)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="save a model (e.g. a built-in one) as a folder vLLM and transformers load")
    exp.add_argument("model", help="model id or folder")
    exp.add_argument("folder", help="the folder to write")
    exp.add_argument("--dtype", default="float32")
    exp.set_defaults(func=cmd_export)

    gen = sub.add_parser("generate", help="answer one prompt about images")
    gen.add_argument("--model", default="seeright/shapes-smol")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--image", action="append", default=[])
    gen.add_argument("--intervention", action="append", default=[], metavar="NAME[:k=v,...]", help=_METHODS_HELP)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32")
    gen.set_defaults(func=cmd_generate)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="run POPE or CHAIR in-process, resumable").add_subparsers(dest="benchmark", required=True)
    for name in ("pope", "chair"):
        e = ev.add_parser(name)
        e.add_argument("--model", required=True, help="model id or folder (in-process), or the served model name")
        e.add_argument("--endpoint", help="base URL of a running seeright server, e.g. http://127.0.0.1:8000")
        e.add_argument("--api-key", help="Bearer key for --endpoint")
        e.add_argument("--images", required=True, help="image folder (COCO val2014 file names)")
        e.add_argument("--out", required=True)
        e.add_argument("--limit", type=int, help="first N questions per split / images")
        e.add_argument("--intervention", action="append", default=[], metavar="NAME[:k=v,...]", help=_METHODS_HELP)
        e.add_argument("--batch-size", type=int, default=8)
        e.add_argument("--device", default="cpu")
        e.add_argument("--dtype", default="float32")
        if name == "pope":
            e.add_argument("--split", nargs="+", default=list(pope.SPLITS), choices=pope.SPLITS)
            e.add_argument("--questions", help="folder with coco_pope_<split>.json (default: the shipped files)")
            e.add_argument("--dataset", help="a datasets folder (save_to_disk) with lmms-lab/POPE columns")
            e.add_argument("--prompt", choices=sorted(pope.PROMPTS), default="plain")
        else:
            e.add_argument("--gt", help="image id -> objects JSON(.gz); default: the shipped COCO-2014 file")
            e.add_argument("--lemmatizer", choices=["builtin", "nltk"], default="builtin")
        e.add_argument("--max-new-tokens", type=int, help="default: 10 for POPE, 512 for CHAIR")
        e.set_defaults(func=cmd_eval)
    es = ev.add_parser("shapes", help="the shapes results table: every method on shapes-POPE and shapes-CHAIR")
    es.add_argument("--model", default="seeright/shapes-llava")
    es.add_argument("--out", required=True)
    es.add_argument("--seed", type=int, nargs="+", default=[shapes.DEFAULT_SEED],
                    help="benchmark seeds (a fresh seed = fresh scenes); several: DIR/seedS each")
    es.add_argument("--images", type=int, default=500, help="scenes in the benchmark")
    es.add_argument("--only", nargs="+", metavar="LABEL", help="run only these rows (labels as in the table, e.g. baseline)")
    es.add_argument("--row", action="append", metavar="'METHOD KEY=VALUE ...'",
                    help="also run this setting (repeatable; e.g. 'gift alpha=2'); without --only, beside the baseline only")
    es.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                    help="load a PEFT LoRA adapter; rows '@NAME' and '@NAME METHOD ...' run on it")
    es.add_argument("--batch-size", type=int, default=32)
    es.add_argument("--device", default="cpu")
    es.add_argument("--dtype", default="float32")
    es.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                    help="vllm: run the rows on the vLLM engine (its environment; rows it does not host are left out)")
    es.add_argument("--max-model-len", type=int, help="--engine vllm: context length (default: the model's)")
    es.set_defaults(func=cmd_eval_shapes)
    lm = ev.add_parser("lmms-pope", help="lmms-eval's POPE task against a running server, on a local shapes split, "
                       "scored by lmms-eval and by seeright")
    lm.add_argument("--endpoint", required=True, help="base URL of the running server, e.g. http://127.0.0.1:8000")
    lm.add_argument("--model", required=True, help="the served model id")
    lm.add_argument("--preset", nargs="*", default=[], help="also run these presets (model id +preset)")
    lm.add_argument("--lmms-python", required=True, help="python of the environment lmms-eval is installed in")
    lm.add_argument("--out", required=True, help="folder for the task (lmms-eval --include_path), its runs and samples")
    lm.add_argument("--images", type=int, default=100, help="scenes (about 4 questions each)")
    lm.add_argument("--seed", type=int, default=shapes.DEFAULT_SEED + 1, help="scene seed (default: not the testbed table's)")
    lm.add_argument("--split", choices=pope.SPLITS, default="adversarial")
    lm.add_argument("--concurrency", type=int, default=8, help="lmms-eval's num_concurrent")
    lm.add_argument("--json", action="store_true")
    lm.set_defaults(func=cmd_lmms_pope)
    for measuring in (es, lm):
        _add_record_options(measuring)


def _add_record_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default=os.environ.get("SEERIGHT_RESULTS_DIR", "results"),
                        help="folder of result records (default: results, or $SEERIGHT_RESULTS_DIR)")
    parser.add_argument("--no-record", action="store_true", help="print the measurement only, keep no record")


def _add_results(sub: argparse._SubParsersAction) -> None:
    res = sub.add_parser("results", help="render the docs' result tables from the records, or check them")
    res.add_argument("action", choices=["render", "check"])
    res.add_argument("--docs", default="docs", help="the manual's folder")
    res.add_argument("--results", default=os.environ.get("SEERIGHT_RESULTS_DIR", "results"), help="folder of result records")
    res.set_defaults(func=cmd_results)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from seeright.tools import serving_bench

    bn = sub.add_parser("bench", help="cost of each intervention relative to a same-process baseline")
    bn.add_argument("--model", default=BENCH_MODEL,
                    help=f"default {BENCH_MODEL}; with --engine vllm: seeright/shapes-smol")
    bn.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                    help="vllm: both engines on the default model with an image: plain tokens/s, each hosted method's "
                         "per-token cost, the idle hooks' cost, plain rows beside method rows")
    bn.add_argument("--new-tokens", type=int, default=64)
    bn.add_argument("--block-size", type=int, help="--engine vllm: tokens per KV-cache block (vllm_block_size); "
                    "default: vLLM's for the device")
    bn.add_argument("--reps", type=int, default=5, help="timed rounds of single requests")
    bn.add_argument("--batch-reps", type=int, default=3, help="timed rounds of the batch-of-8 runs")
    bn.add_argument("--warmup", type=int, default=1)
    bn.add_argument("--device", default="cpu")
    bn.add_argument("--dtype", default="float32")
    bn.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bn.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    bn.add_argument("--no-reference", action="store_true", help="skip timing the literal reference loops")
    bn.add_argument("--serving", action="store_true", help="the scheduler under load: short-behind-long, open-loop rates")
    serving_bench.add_arguments(bn)
    bn.add_argument("--label", help="--serving: name of the record (default: the model)")
    _add_record_options(bn)
    bn.set_defaults(func=cmd_bench)


def _add_loadtest(sub: argparse._SubParsersAction) -> None:
    lt = sub.add_parser("loadtest", help="bounded load on a loopback server: throughput, latency, errors, memory")
    lt.add_argument("--url", help="base URL of a running server on this machine (loopback only)")
    lt.add_argument("--spawn", action="store_true", help="start a server for the test instead (--model, --queue-size)")
    lt.add_argument("--model", default="seeright/shapes-llava")
    lt.add_argument("--queue-size", type=int, default=16)
    lt.add_argument("--max-batch-size", type=int, default=8)
    lt.add_argument("--requests", type=int, default=64)
    lt.add_argument("--concurrency", type=int, default=8)
    lt.add_argument("--duration", type=float, default=60.0, help="stop sending after this many seconds")
    lt.add_argument("--max-tokens", type=int, default=16)
    lt.add_argument("--stream-every", type=int, default=2, help="every n-th request streams (0: none)")
    lt.add_argument("--runs", type=int, default=1, help="repeat the load, to watch memory across runs")
    lt.add_argument("--api-key")
    lt.add_argument("--hostile", action="store_true",
                    help="instead of load: one hostile request at a time, /health polled meanwhile (docs: Reliability)")
    lt.add_argument("--label", help="name of the record (default: the model)")
    _add_record_options(lt)
    lt.set_defaults(func=cmd_loadtest)


def _add_score(sub: argparse._SubParsersAction) -> None:
    score = sub.add_parser("score", help="score existing prediction files").add_subparsers(dest="benchmark", required=True)
    sp = score.add_parser("pope", help="POPE answers JSONL (question_id, text)")
    answers = sp.add_mutually_exclusive_group(required=True)
    answers.add_argument("--answers", help="answers JSONL (question_id, text)")
    answers.add_argument("--lmms-samples", help="lmms-eval's --log_samples JSONL of a POPE task")
    sp.add_argument("--labels", nargs="+", required=True, help="label files, one per split (coco_pope_<split>.json)")
    sp.add_argument("--questions", help="LLaVA-style question file with 'category': group and zip in order")
    sp.add_argument("--parser", choices=sorted(pope.PARSERS), default="official")
    _add_record_options(sp)
    sp.set_defaults(func=cmd_score_pope)
    sc = score.add_parser("chair", help="CHAIR captions JSONL (image_id, caption|text)")
    sc.add_argument("--captions", required=True)
    sc.add_argument("--gt", help="image id -> objects JSON(.gz); default: the shipped COCO-2014 file")
    sc.add_argument("--gt-variant", choices=["nltk", "pattern"], default="nltk")
    sc.add_argument("--coco-instances", nargs="+", help="COCO instances_*.json: build ground truth from annotations")
    sc.add_argument("--coco-captions", nargs="+", help="COCO captions_*.json whose objects join the ground truth")
    sc.add_argument("--lemmatizer", choices=["builtin", "nltk"], default="builtin")
    sc.add_argument("--per-caption", action="store_true")
    _add_record_options(sc)
    sc.set_defaults(func=cmd_score_chair)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
