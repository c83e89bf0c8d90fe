"""``tuneforge <verb>``: parse arguments, load the config, hand over to a recipe or tool.

Errors a user can cause (config, data, paths) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tuneforge.errors import USER_ERROR_EXIT_CODE, UserError
from tuneforge.quiet import quiet_third_party

MODEL_HELP = ("a model: 'default' (embedded SmolLM2-135M-Instruct), a Hugging Face folder, a .gguf file, a tuneforge "
              "run directory (base + adapter), or a hub id")


def _train(args) -> int:
    from tuneforge.api import run_training
    from tuneforge.config import load_config
    from tuneforge.engine.signals import EXIT_CODES

    config = load_config(args.config, args.overrides)
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    # The training path of tuneforge.train(); the bar shows when standard error is a terminal.
    summary = run_training(config, overwrite=args.overwrite, resume=args.resume or False, force=args.force, log=log)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
        return 0
    if summary.get("run_dir") and summary.get("stop_reason") != "interrupted":
        log(f"run directory: {summary['run_dir']} (summary.json, curves.png, metrics.jsonl)")
    print(json.dumps(summary))
    return EXIT_CODES.get(summary.get("signal"), 0) if summary.get("stop_reason") == "interrupted" else 0


def _plot(args) -> int:
    from tuneforge.engine.plots import plot_runs

    out = plot_runs(args.run_dirs, args.out)
    print(f"wrote {out}")
    return 0


def _preview(args) -> int:
    from tuneforge.config import load_config
    from tuneforge.data.dataset import DataReport, load_conversations, tokenize_conversations
    from tuneforge.data.mixture import tokenize_sources
    from tuneforge.data.preview import preview_rows, render_example
    from tuneforge.data.templates import load_template
    from tuneforge.models.loading import load_tokenizer, resolve_model
    from tuneforge.recipes.registry import get

    config = load_config(args.config, args.overrides)
    data = get(config.method).data  # what data.train holds decides what is shown
    if data == "prompts":
        return _preview_prompts(args, config)
    if data in ("pairs", "unpaired"):
        return _preview_preference(args, config, unpaired=data == "unpaired")
    report = DataReport()
    conversations = load_conversations(config.data.train, config.data, report)
    tokenizer = load_tokenizer(resolve_model(config.model.name_or_path))
    template = load_template(config.data.template, tokenizer)
    examples = tokenize_sources(conversations, report, lambda rows, counts: tokenize_conversations(
        rows, template, tokenizer, config.data, counts))
    colour = sys.stdout.isatty() and not args.no_color
    print(f"template: {template.name}; trained tokens are "
          + ("shown in green" if colour else "between [[ and ]]"))
    for heading, example in preview_rows(examples, args.n, report):
        print(f"--- {heading} ({len(example.input_ids)} tokens, {example.num_trained} trained"
              f"{', truncated' if example.truncated else ''})")
        print(render_example(example, tokenizer, colour))
    print("---")
    for line in report.lines():
        print(line)
    return 0


def _preview_preference(args, config, unpaired: bool) -> int:
    from tuneforge.data.dataset import DataReport
    from tuneforge.data.preference import load_preference_rows, tokenize_pairs, tokenize_unpaired
    from tuneforge.data.mixture import tokenize_sources
    from tuneforge.data.preview import preview_rows, render_pair, render_unpaired
    from tuneforge.data.templates import load_template
    from tuneforge.models.loading import load_tokenizer, resolve_model

    report = DataReport()
    rows = load_preference_rows(config.data.train, config.data, report, unpaired=unpaired)
    tokenizer = load_tokenizer(resolve_model(config.model.name_or_path))
    template = load_template(config.data.template, tokenizer)
    tokenize = tokenize_unpaired if unpaired else tokenize_pairs
    examples = tokenize_sources(rows, report, lambda items, counts: tokenize(items, template, tokenizer, config.data,
                                                                             counts))
    colour = sys.stdout.isatty() and not args.no_color
    print(f"method: {config.method}; template: {template.name}; response tokens (the ones scored) are "
          + ("shown in green" if colour else "between [[ and ]]"))
    for heading, example in preview_rows(examples, args.n, report):
        print(f"--- {heading}")
        print(render_unpaired(example, tokenizer, colour) if unpaired else render_pair(example, tokenizer, colour))
    print("---")
    for line in report.lines():
        print(line)
    return 0


def _preview_prompts(args, config) -> int:
    from tuneforge.data.prompts import read_prompt_data, tokenize_prompt_data
    from tuneforge.data.templates import load_template
    from tuneforge.models.loading import load_tokenizer, resolve_model

    read = read_prompt_data(config)
    tokenizer = load_tokenizer(resolve_model(config.model.name_or_path))
    template = load_template(config.data.template, tokenizer)
    prepared = tokenize_prompt_data(read, config, tokenizer, template)
    count = config.method_section.samples_per_prompt
    print(f"method: {config.method}; template: {template.name}; each prompt as the model sees it before sampling "
          f"{count} response{'s' if count > 1 else ''}")
    for example in prepared.train[: args.n]:
        print(f"--- {len(example.input_ids)} tokens; row fields: {', '.join(sorted(example.fields))}")
        print(example.text)
    print("---")
    for report in prepared.reports:
        for line in report.lines():
            print(line)
    return 0


def _generate(args) -> int:
    from tuneforge.data.formats import Message
    from tuneforge.generation import Generator

    generator = Generator.load(args.model, template=args.template, dtype=args.dtype)
    messages = ([Message("system", args.system)] if args.system else []) + [Message("user", args.prompt)]
    print(generator.generate([messages], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p)[0])
    return 0


def _chat(args) -> int:
    """Chat with a model: line editing and history on a terminal, each answer streamed as it is generated, and
    Ctrl-C stopping an answer without leaving (what was generated of it stays in the history)."""
    import signal

    from tuneforge.data.formats import Message
    from tuneforge.engine.signals import StopRequest
    from tuneforge.generation import Generator

    generator = Generator.load(args.model, template=args.template, dtype=args.dtype)
    system = [Message("system", args.system)] if args.system else []
    history = list(system)
    _line_editing()
    print("tuneforge chat: type a message; Ctrl-C stops an answer, /reset clears the history, /exit or Ctrl-D "
          "quits.", file=sys.stderr)
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, as Python's own prompt does
            print(file=sys.stderr)
            continue
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            history = list(system)
            print("history cleared" + (" (the system message stays)" if system else ""), file=sys.stderr)
            continue
        if not text.strip():
            continue
        history.append(Message("user", text))
        pieces: list[str] = []

        def show(piece: str) -> None:
            pieces.append(piece)
            print(piece, end="", flush=True)

        print("assistant> ", end="", flush=True)
        result = None
        with StopRequest((signal.SIGINT,)) as stop:  # Ctrl-C ends the answer at its next token
            try:
                result = generator.stream(history, show, max_new_tokens=args.max_new_tokens,
                                          temperature=args.temperature, top_p=args.top_p,
                                          should_stop=lambda: stop.requested is not None)
            except KeyboardInterrupt:  # a second Ctrl-C before the first was seen
                pass
        print()
        if stop.requested and (result is None or not result.stopped and result.num_tokens < args.max_new_tokens):
            print("[stopped: the partial answer stays in the history; /reset clears it]", file=sys.stderr)
        history.append(Message("assistant", "".join(pieces) or " "))


def _line_editing() -> None:
    """Arrow keys, Ctrl-R and a history kept across sessions (``$TUNEFORGE_HOME/chat_history``) for ``input()``,
    when standard input is a terminal and Python has readline."""
    if not sys.stdin.isatty():
        return
    try:
        import readline
    except ImportError:  # Windows
        return
    import atexit

    from tuneforge.models.loading import cache_dir

    path = cache_dir() / "chat_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass  # the first session, or an unreadable file: start empty
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass  # a read-only home: the session still worked

    atexit.register(save)


def _import_gguf(args) -> int:
    from tuneforge.models.loading import import_gguf

    out = import_gguf(args.gguf_file, args.out_dir, dtype=args.dtype)
    print(f"imported {args.gguf_file} into {out}")
    return 0


def _merge(args) -> int:
    from tuneforge.models.merge import merge_run

    out = merge_run(args.run_dir, args.out_dir, dtype=args.dtype)
    print(f"merged {args.run_dir} into {out}")
    return 0


def _export(args) -> int:
    from tuneforge.models.export import export_gguf

    out = export_gguf(args.model, args.out_file, dtype=args.dtype)
    print(f"exported {args.model} to {out} ({args.format}, {args.dtype})")
    return 0


def _push(args) -> int:
    from tuneforge.models.push import push

    url = push(args.source, args.repo_id, merged=args.merged, private=args.private, revision=args.revision,
               log=lambda message: print(message, file=sys.stderr, flush=True))
    print(f"pushed {args.source} to {url}")
    return 0


def _score(args) -> int:
    from tuneforge.data.formats import Conversation, to_conversation
    from tuneforge.data.preference import to_preference_row
    from tuneforge.data.readers import BadRow, read_rows
    from tuneforge.rewards.scoring import RewardScorer

    if args.out and os.path.exists(args.out):
        raise UserError(f"{args.out} exists; choose a new output file (score never overwrites)")
    # Every row is validated before the model loads.
    rows, conversations = [], []
    for row in read_rows(args.data):
        if isinstance(row, BadRow):
            raise row.error
        if "chosen" in row.fields:
            pair = to_preference_row(row.fields, args.data, row.number)
            conversations += [Conversation(pair.prompt + pair.chosen, args.data, row.number),
                              Conversation(pair.prompt + pair.rejected, args.data, row.number)]
            rows.append((row.fields, 2))
        else:
            conversations.append(to_conversation(row.fields, "auto", args.data, row.number))
            rows.append((row.fields, 1))
    scorer = RewardScorer.load(args.model, max_length=args.max_length)
    scores = scorer.score(conversations, batch_size=args.batch_size, progress="scoring")
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    position, pairs, right = 0, 0, 0
    try:
        for fields, count in rows:
            if count == 2:
                chosen, rejected = scores[position], scores[position + 1]
                fields = {**fields, "chosen_score": chosen, "rejected_score": rejected}
                pairs += 1
                right += chosen > rejected
            else:
                fields = {**fields, "score": scores[position]}
            position += count
            out.write(json.dumps(fields) + "\n")
    finally:
        if args.out:
            out.close()
    summary = f"scored {len(rows)} rows ({len(scores)} sequences), mean score {sum(scores) / len(scores):.4f}"
    if pairs:
        summary += f"; chosen scored above rejected in {right}/{pairs} pairs ({right / pairs:.1%})"
    print(summary + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def _eval(args) -> int:
    from tuneforge.eval.evaluate import main as run_eval

    return run_eval(args)


def _report(args) -> int:
    from tuneforge.eval.report import write_report

    files = write_report(args.run_dir, compare=args.compare or [], out=args.out, samples=args.samples)
    print(f"wrote {files.html} and {files.markdown} (figures: {', '.join(str(p) for p in files.figures)})")
    return 0


def _bench(args) -> int:
    from tuneforge.bench import run_bench

    result = run_bench(method=args.method, model=args.model, data=args.data, batch_size=args.batch_size,
                       max_length=args.max_length, steps=args.steps, lora_r=args.lora_r, dtype=args.dtype,
                       packing=args.packing, full=args.full, gradient_checkpointing=args.gradient_checkpointing,
                       load_in=args.load_in, precompute_ref=args.precompute_ref, generations=args.generations,
                       max_new_tokens=args.max_new_tokens, model_dtype=args.model_dtype,
                       attn_implementation=args.attn_implementation, loss_chunk_size=args.loss_chunk_size,
                       rows=args.rows, warmup_steps=args.warmup_steps, compile=args.compile,
                       checkpoint_fraction=args.checkpoint_fraction, rows_shape=args.row_set,
                       fused_lora=not args.no_fused_lora, fused_activations=not args.no_fused_activations)
    print(json.dumps(result))
    return 0


def _estimate(args) -> int:
    from tuneforge.models.memory import (ESTIMATE_DEFAULTS, RUN_CONFIG_SUFFIXES, estimate, format_estimate,
                                         resolve_shape, run_config_settings)

    spec, taken = args.model, {}
    if spec.lower().endswith(RUN_CONFIG_SUFFIXES):  # a run config: its model, and its settings where no flag is given
        spec, implied = run_config_settings(spec)
        taken = {key: value for key, value in implied.items() if getattr(args, key, None) is None}
    shape = resolve_shape(spec)
    given = {key: getattr(args, key) for key in ESTIMATE_DEFAULTS if getattr(args, key) is not None}
    s = {**ESTIMATE_DEFAULTS, **taken, **given}  # flags, then the run config, then the defaults
    result = estimate(shape, method=s["method"], seq_len=s["seq_len"], batch=s["batch"], lora_r=s["lora_r"],
                      grad_checkpointing=s["grad_checkpointing"], optimizer=s["optimizer"],
                      world_size=args.world_size, fsdp=args.fsdp, dtype=s["dtype"],
                      activations_gb=args.activations_gb, loss_chunk=s["loss_chunk_size"], device=args.device,
                      checkpoint_fraction=s["checkpoint_fraction"], lora_dropout=s.get("lora_dropout", True))
    if args.json:
        print(json.dumps({"model": shape.name, "method": s["method"], **result.as_dict(),
                          **({"from_config": {"config": args.model, **taken}} if taken else {})}))
    else:
        if taken:
            values = ", ".join(f"{key.replace('_', '-')} {value}" for key, value in taken.items())
            print(f"from {args.model} (model {spec}): {values}; flags override these")
        strategy = f"FSDP x{args.world_size}" if args.fsdp else f"DDP x{args.world_size}" if args.world_size > 1 \
            else "1 process"
        print(format_estimate(shape, result, f"{shape.name}, {s['method']}, {s['dtype']}, {s['optimizer']}, "
                                             f"seq {s['seq_len']} x batch {s['batch']}, {strategy}, {args.device}"))
    return 0


def _list_options_in_help(parser: argparse.ArgumentParser) -> None:
    """Append the methods and every config option to ``parser``'s help when it is shown (listing them imports
    every recipe, which no other use of the parser should pay for)."""
    format_help = parser.format_help

    def with_options() -> str:
        from tuneforge.config import describe_options

        parser.epilog = "Config options (key (type) = default):\n" + describe_options()
        return format_help()

    parser.format_help = with_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneforge", description="Post-training for causal language models (SFT with LoRA or full fine-tuning).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'tuneforge VERB --help' for the options of each verb.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    train = verbs.add_parser(
        "train", help="train with the method named in the config (train --help lists them); works under torchrun",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train from a YAML config plus key=value overrides with dotted keys "
                    "(train.lr=1e-4 lora.r=8).")
    _list_options_in_help(train)
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lora.r=8 train.epochs=1")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                       help="continue from the newest complete checkpoint of train.output_dir, or from CHECKPOINT")
    train.add_argument("--force", action="store_true",
                       help="resume even if the config changes what is trained (model, data, batch geometry)")
    train.set_defaults(func=_train)

    plot = verbs.add_parser("plot", help="draw the training curves of one or more runs on one figure")
    plot.add_argument("run_dirs", nargs="+", help="run directories (each with metrics.jsonl)")
    plot.add_argument("--out", default="curves.png",
                      help="output image; the suffix picks the format: .png, .svg, .pdf ... (default curves.png)")
    plot.set_defaults(func=_plot)

    data = verbs.add_parser("data", help="inspect training data").add_subparsers(dest="data_verb", metavar="VERB")
    data.required = True
    preview = data.add_parser("preview", help="show formatted rows with trained tokens marked, then counts")
    preview.add_argument("config", help="YAML config file (its data and template are used)")
    preview.add_argument("overrides", nargs="*", help="key=value overrides")
    preview.add_argument("--n", type=int, default=3, help="rows to show (default 3)")
    preview.add_argument("--no-color", action="store_true", help="mark trained tokens with [[ ]] even on a terminal")
    preview.set_defaults(func=_preview)

    for name, func, text in (("generate", _generate, "answer one prompt"), ("chat", _chat, "interactive chat")):
        verb = verbs.add_parser(name, help=text, description=f"{text.capitalize()} with the training template.")
        verb.add_argument("model", help=MODEL_HELP)
        if name == "generate":
            verb.add_argument("--prompt", required=True, help="the user message")
        verb.add_argument("--system", help="system message")
        verb.add_argument("--template", help="template override (default: the run's own, else the tokenizer's)")
        verb.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
        verb.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        verb.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
        verb.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        verb.set_defaults(func=func)

    gguf = verbs.add_parser("import-gguf", help="turn a GGUF file into a trainable Hugging Face checkpoint")
    gguf.add_argument("gguf_file", help="path of the .gguf file")
    gguf.add_argument("out_dir", help="new folder for the checkpoint (must not exist or be empty)")
    gguf.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gguf.set_defaults(func=_import_gguf)

    merge = verbs.add_parser("merge", help="merge a LoRA run's adapter into its base and save a plain checkpoint")
    merge.add_argument("run_dir", help="a LoRA run directory")
    merge.add_argument("out_dir", help="new folder for the merged model")
    merge.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    merge.set_defaults(func=_merge)

    export = verbs.add_parser("export", help="write a model or run (LoRA merged) as one file for other runtimes",
                              description="Write weights, tokenizer and chat template as one GGUF file "
                                          "(Llama models with a byte-level BPE tokenizer).")
    export.add_argument("model", help="a run directory, a Hugging Face folder or hub id, or a .gguf file")
    export.add_argument("--format", required=True, choices=["gguf"], help="output format")
    export.add_argument("out_file", help="new file to write (never overwritten)")
    export.add_argument("--dtype", default="f16", choices=["f32", "f16", "q8_0", "q4_0"],
                        help="storage type of the weight matrices (default f16; f32 is exact; q8_0 and q4_0 are "
                             "llama.cpp's 8- and 4-bit block types)")
    export.set_defaults(func=_export)

    push = verbs.add_parser("push", help="upload a run (adapter, or merged) or a model folder to the Hugging Face Hub",
                            description="Upload a LoRA run's adapter with its tokenizer (training chat template) and "
                                        "model card, the run merged into its base (--merged), a full run's model, or "
                                        "a model folder (plus a card when it has none). Needs a token (HF_TOKEN or "
                                        "`hf auth login`); fails in seconds without one or without a network.")
    push.add_argument("source", metavar="RUN_OR_FOLDER", help="a run directory or a model folder")
    push.add_argument("repo_id", metavar="REPO_ID", help="OWNER/NAME of the model repo (created when missing)")
    push.add_argument("--merged", action="store_true", help="merge a LoRA run into its base and upload that")
    push.add_argument("--private", action="store_true", help="create the repo private (an existing one keeps its "
                                                             "visibility)")
    push.add_argument("--revision", help="branch to commit to, created when missing (default main)")
    push.set_defaults(func=_push)

    score = verbs.add_parser("score", help="score rows with a reward model; prints JSONL with the scores",
                             description="Score each row of a data file with a reward model (a method: reward run). "
                                         "Pairs (prompt/chosen/rejected) get chosen_score and rejected_score and the "
                                         "pairwise accuracy is reported; other rows (messages, prompt/completion, "
                                         "alpaca, sharegpt) get score.")
    score.add_argument("model", help="a reward-model run directory, or a sequence-classification model folder")
    score.add_argument("--data", required=True, help="data file (JSONL, JSON, CSV, Parquet)")
    score.add_argument("--out", help="write JSONL here instead of standard output")
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument("--max-length", type=int, default=1024, help="longer rows keep their last tokens")
    score.set_defaults(func=_score)

    ev = verbs.add_parser("eval", help="measure a model or run (and others beside it); writes eval.json",
                          description="Held-out loss, generation metrics against references, user metrics, behaviour "
                                      "(stops by itself, refusals, length), preference accuracy and a reward-model "
                                      "win rate, for one model and any --compare ones. Metrics: docs/evaluation.md.")
    ev.add_argument("model", nargs="?", metavar="MODEL_OR_RUN", help=MODEL_HELP + " (put it first)")
    ev.add_argument("--config", help="YAML file with the same keys as these flags (flags override it)")
    ev.add_argument("--data", help="held-out rows: SFT rows (reference = last assistant message) or prompt-only rows")
    ev.add_argument("--pairs", help="preference pairs (prompt/chosen/rejected) for preference accuracy")
    ev.add_argument("--harmful", help="prompts that should be refused (refusal_rate_harmful)")
    ev.add_argument("--benign", help="prompts that should be answered (refusal_rate_benign: over-refusal)")
    ev.add_argument("--metrics", nargs="+", action="extend", metavar="METRIC",
                    help="metric names and user metrics module:fn or file.py:fn (default: all the files allow)")
    ev.add_argument("--compare", nargs="+", action="extend", metavar="MODEL",
                    help="more models or runs, one column each")
    ev.add_argument("--label", nargs="+", action="extend", dest="labels", metavar="NAME",
                    help="column names, in model order")
    ev.add_argument("--judge", help="reward model that judges the model against the first --compare one")
    ev.add_argument("--beta", type=float, help="implicit reward beta (default: the run's dpo.beta, else 0.1)")
    ev.add_argument("--max-new-tokens", type=int, help="default 64")
    ev.add_argument("--temperature", type=float, help="0 = greedy (default)")
    ev.add_argument("--top-p", type=float)
    ev.add_argument("--seed", type=int, help="seeds sampling (default 0)")
    ev.add_argument("--batch-size", type=int, help="default 8")
    ev.add_argument("--max-length", type=int, help="longest sequence for loss and pairs (default 1024)")
    ev.add_argument("--template", help="template override (default: the run's own, else the tokenizer's)")
    ev.add_argument("--system-prompt", help="system message for rows that have none")
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--limit", type=int, help="first N rows of each file")
    ev.add_argument("--samples", type=int, help="prompts stored with every model's answer (default 5)")
    ev.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks")
    ev.add_argument("--lm-eval-limit", type=int, help="examples per lm-eval task")
    ev.add_argument("--out", help="eval.json path (default RUN_DIR/eval.json; an existing one becomes eval.N.json)")
    ev.set_defaults(func=_eval)

    report = verbs.add_parser(
        "report", help="one self-contained HTML page (and Markdown) for a run: config, curves, evaluation, samples",
        description="Write RUN_DIR/report.html and report.md (figures beside them as report-*.png): the run's "
                    "config, its training curves, the evaluation in RUN_DIR/eval.json (written by tuneforge eval) "
                    "and generations side by side. The HTML has no external resources: it opens offline and can be "
                    "mailed. A previous report is replaced; any other existing file is never overwritten.")
    report.add_argument("run_dir", help="a run directory (train.output_dir)")
    report.add_argument("--compare", nargs="+", action="extend", metavar="OTHER_RUN_DIR",
                        help="more run directories: their curves on the same figures, their evaluations beside")
    report.add_argument("--out", help="OUT.html (OUT.md and OUT-*.png beside it), or a folder for report.html "
                                      "(default: RUN_DIR/report.html)")
    report.add_argument("--samples", type=int, default=5, help="prompts shown side by side (default 5)")
    report.set_defaults(func=_report)

    bench = verbs.add_parser("bench", help="time a short fixed training workload; prints one JSON line",
                             description="Throughput (tokens/s, padding excluded), peak memory and model FLOPs "
                                         "utilisation of a short training workload, after one warm-up step.")
    bench.add_argument("--method", default="sft",
                       help="a method on rows (tokens/s), on pairs (pairs/s on synthetic preference pairs), or online "
                            "RL (steps/s on addition prompts, with the share of time spent sampling); default sft")
    bench.add_argument("--model", default="default", help=MODEL_HELP)
    bench.add_argument("--data", help="a data file of the method's format (default: fixed synthetic rows or pairs)")
    bench.add_argument("--precompute-ref", action="store_true",
                       help="dpo: reference log-probs computed once before the timed steps")
    bench.add_argument("--batch-size", type=int, default=4)
    bench.add_argument("--max-length", type=int, default=256)
    bench.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up step (default 5)")
    bench.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    bench.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="bfloat16 runs bf16 autocast over float32 weights")
    bench.add_argument("--packing", action="store_true", help="pack rows into max-length sequences")
    bench.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16"],
                       help="dtype the weights are stored in (model.dtype); --dtype is the compute dtype")
    bench.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flex_attention"],
                       help="model.attn_implementation (flex_attention: packed rows skip masked blocks; CUDA)")
    bench.add_argument("--loss-chunk-size", type=int, default=256, help="train.loss_chunk_size (default 256)")
    bench.add_argument("--rows", type=int, default=64, help="synthetic rows when --data is not given (default 64)")
    bench.add_argument("--row-set", default="synthetic", choices=["synthetic", "alpaca"],
                       help="the rows of a method on rows when --data is not given: synthetic (word-list rows, about "
                            "60-250 tokens) or alpaca (instruction, sometimes an input, a longer answer; about "
                            "100-300 tokens, mostly completion); default synthetic")
    bench.add_argument("--no-fused-lora", action="store_true",
                       help="lora.fused: false (PEFT's LoRA layers instead of the fused LoRA autograd path)")
    bench.add_argument("--no-fused-activations", action="store_true",
                       help="train.fused_activations: false (the model's own RMSNorm/SwiGLU)")
    bench.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first (default 1)")
    bench.add_argument("--compile", action="store_true", help="train.compile: torch.compile the decoder (sft)")
    bench.add_argument("--checkpoint-fraction", type=float, default=1.0,
                       help="train.checkpoint_fraction: with --gradient-checkpointing, the share of layers recomputed")
    bench.add_argument("--load-in", default="none", choices=["none", "4bit", "8bit"],
                       help="quantize the base through bitsandbytes (QLoRA)")
    bench.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in backward (TRL's SFTConfig default)")
    bench.add_argument("--generations", type=int, default=4,
                       help="online RL: responses sampled per prompt (grpo, rloo; default 4)")
    bench.add_argument("--max-new-tokens", type=int, default=32,
                       help="online RL: longest sampled response (default 32)")
    bench.set_defaults(func=_bench)

    est = verbs.add_parser("estimate", help="memory breakdown of a training run, from the model config only",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Weights, gradients, optimiser states, activations, logits and adapters "
                                       "from the model's config.json; no weight is downloaded or allocated. "
                                       "Formulas: docs/memory.md.",
                           epilog="With --model RUN.yaml (a run config, as tuneforge train takes it), the run's "
                                  "model, method (lora.enabled,\nmodel.load_in), seq length (data.max_length), batch "
                                  "(train.batch_size), lora.r, gradient checkpointing,\ndtype, optimizer and loss "
                                  "chunk are used where no flag is given; the values taken are printed.\nPaths "
                                  "written in a config file are relative to that file; paths on the command line, to "
                                  "the working\ndirectory.")
    est.add_argument("--model", default="default", metavar="MODEL_OR_CONFIG",
                     help="a run config (.yaml), a config.json, a Hugging Face model folder, a tuneforge run "
                          "directory, a hub id (its config.json from the local Hugging Face cache), 'default' "
                          "(SmolLM2-135M) or a built-in name (llama-7b, llama-2-13b, llama-3-8b, mistral-7b, "
                          "smollm2-135m, smollm2-360m)")
    est.add_argument("--method", choices=["full", "lora", "qlora"], help="default lora")
    est.add_argument("--seq-len", type=int, help="default 512")
    est.add_argument("--batch", type=int, help="micro-batch size per process (default 1)")
    est.add_argument("--lora-r", type=int, help="default 16")
    est.add_argument("--grad-checkpointing", action="store_true", default=None)
    est.add_argument("--checkpoint-fraction", type=float,
                     help="train.checkpoint_fraction: with --grad-checkpointing, the share of layers recomputed "
                          "(default 1.0)")
    est.add_argument("--optimizer", choices=["adamw", "adamw8bit", "sgd"], help="default adamw")
    est.add_argument("--world-size", type=int, default=1)
    est.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimiser states")
    est.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                     help="weights and activations; for qlora the compute dtype (activations); default float32")
    est.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                     help="cuda (default): live tensors, as max_memory_allocated counts them; cpu: the process's "
                          "peak resident memory (adds the Python process, glibc heap retention and, for qlora, "
                          "the mapped float checkpoint)")
    est.add_argument("--activations-gb", type=float, help="use this activation figure instead of the formula")
    est.add_argument("--loss-chunk-size", type=int, help="train.loss_chunk_size (default 256)")
    est.add_argument("--json", action="store_true", help="print one JSON object (bytes) instead of a table")
    est.set_defaults(func=_estimate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after flags (train CONFIG --overwrite lora.r=8).
    stray = [item for item in extra if "=" not in item or item.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides.extend(extra)
    if isinstance(getattr(args, "resume", None), str) and "=" in args.resume:
        # `--resume key=value` would take the override as the checkpoint path.
        args.overrides.append(args.resume)
        args.resume = True
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    quiet_third_party()
    try:
        return args.func(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


def entry() -> None:
    """Console entry point (``tuneforge`` and ``python -m tuneforge``)."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun the work is done and the process group is gone, but gloo/c10d background threads can
        # still abort the interpreter's teardown ("terminate called without an active exception"), turning a
        # finished run into a failed one. Leave without running destructors, after flushing what was printed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
