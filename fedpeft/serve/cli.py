"""Serving subcommands of ``fedpeft``: ``export``, ``chat`` and ``eval``.

Heavy imports (torch, transformers) happen inside the commands, so ``fedpeft --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedpeft.serve.lm_eval_bridge import Harness

LM_EVAL_PIP = "pip install 'lm-eval>=0.4.13,<0.5' (fedpeft's lm-eval extra: pip install 'fedpeft[lm-eval]')"
ADAPTER_HELP = "a run folder (workspace/<job>/<run-id>), its adapter/ folder, or a folder from fedpeft export --out"


def positive_int(value: str) -> int:
    """An argparse type: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _cmd_export(args: argparse.Namespace) -> int:
    from fedpeft.errors import ConfigError
    from fedpeft.serve.export import (
        EXPORT_INFO_FILE,
        check_mergeable,
        check_out,
        export_adapter,
        export_merged,
    )
    from fedpeft.serve.saved import open_adapter

    if not (args.out or args.merge):
        raise ConfigError("fedpeft export: give --out OUT (the adapter folder) and/or --merge OUT (a merged model)")
    if args.out and args.merge and Path(args.out).resolve() == Path(args.merge).resolve():
        raise ConfigError("fedpeft export: --out and --merge name the same folder; give two folders")
    saved = open_adapter(args.adapter)
    for out in filter(None, (args.out, args.merge)):  # every refusal before the first byte is written
        check_out(out, saved.path, force=args.force)
    if args.merge:
        check_mergeable(saved, dequantize=args.dequantize)
    if args.out:
        out = export_adapter(saved, args.out, force=args.force)
        print(f"adapter folder: {out} (peft.PeftModel.from_pretrained(base, '{out}'); base: {saved.model.name})")
    if args.merge:
        out = export_merged(saved, args.merge, force=args.force, dequantize=args.dequantize, device=args.device)
        print(f"merged model: {out} (transformers.AutoModelForCausalLM.from_pretrained('{out}'))")
        settings = {"system prompt": saved.system_prompt, "repetition penalty": saved.repetition_penalty}
        known = ", ".join(f"{k} {v!r}" for k, v in settings.items() if v is not None)
        if known:
            print(f"serve it with the job's {known} (in {out / EXPORT_INFO_FILE})")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from fedpeft.serve.chat import run_chat
    from fedpeft.serve.saved import load_model, open_adapter

    saved = open_adapter(args.adapter)
    model, tok = load_model(saved, args.device)
    if sys.stdin.isatty():
        print(f"chatting with the {saved.method} adapter {saved.path} on {saved.model.name}")
    run_chat(model, tok, sys.stdin, sys.stdout,
             system=saved.system_prompt if args.system is None else (args.system or None),
             max_new_tokens=args.max_new_tokens or saved.max_new_tokens or 256,
             repetition_penalty=args.repetition_penalty or saved.repetition_penalty or 1.1,
             single_turn_template=bool(saved.prompt_template))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fedpeft.models import resolve_devices
    from fedpeft.serve.eval_report import out_dir, report, write_scores
    from fedpeft.serve.evaluate import Column, Scores, TestSet, load_tests, resolve_columns, score, split_items

    targets, overrides = split_items(args.items)
    columns = resolve_columns(targets, args.base, overrides)
    tests = load_tests(args.test or [], columns[0].cfg)  # every refusal before the model loads
    harness = _lm_eval_harness(args)  # lm-eval's task names too (its data is read in harness.session)
    device = args.device or resolve_devices(columns[0].cfg.model.devices)[0]
    out = out_dir(args.out, columns)
    results: dict[tuple[str, str], Scores] = {}

    def done(column: Column, test: TestSet, scores: Scores) -> None:
        write_scores(out, column, test, scores)
        results[column.label, test.label] = scores

    try:
        with harness.session(out, columns) if harness else contextlib.nullcontext():
            score(columns, tests, device, done, each_model=harness.score if harness else None)
    except BaseException:
        if not any(out.iterdir()):  # nothing scored: leave no empty results folder behind
            out.rmdir()
        raise
    print(report(out, columns, tests, results, (harness.report(out),) if harness else ()))
    print(f"\nresults: {out}")
    return 0


def _lm_eval_harness(args: argparse.Namespace) -> Harness | None:
    """The ``--lm-eval`` tasks, found in lm-eval's index (imported only then); None without ``--lm-eval``.

    Raises:
        ConfigError: without --test or --lm-eval, for --lm-eval-* options without --lm-eval, when
            lm-eval is not installed, or for a task name lm-eval does not know.
    """
    from fedpeft.errors import ConfigError

    if not (args.test or args.lm_eval):
        raise ConfigError("fedpeft eval: give --test FILE (question/answer rows, scored as a run scores them) "
                          "and/or --lm-eval TASKS (EleutherAI lm-evaluation-harness tasks)")
    if not args.lm_eval:
        if args.lm_eval_include or args.lm_eval_limit:
            raise ConfigError("fedpeft eval: --lm-eval-include and --lm-eval-limit go with --lm-eval TASKS")
        return None
    try:
        from fedpeft.serve.lm_eval_bridge import Harness
    except ImportError as e:
        raise ConfigError(f"--lm-eval needs EleutherAI's lm-evaluation-harness ({e}); install it with: "
                          f"{LM_EVAL_PIP}") from None
    names = list(dict.fromkeys(n.strip() for given in args.lm_eval for n in given.split(",") if n.strip()))
    if not names:
        raise ConfigError(f"--lm-eval {args.lm_eval[0]!r}: give lm-eval task names, e.g. --lm-eval hellaswag,arc_easy")
    return Harness(names, args.lm_eval_include or [], args.lm_eval_limit)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``export``, ``chat`` and ``eval`` to the ``fedpeft`` subcommands."""
    exp = sub.add_parser(
        "export", help="write a trained adapter for a serving stack: the adapter folder, or merged into its base",
        description="--out OUT: the PEFT adapter folder with the tokenizer and the job's chat template "
                    "(peft.PeftModel.from_pretrained(base, OUT) loads it). --merge OUT: LoRA-family and IA3 "
                    "adapters merged into the base weights, a full model folder with tokenizer and generation "
                    "config (AutoModelForCausalLM.from_pretrained(OUT) loads it). Prompt-learning adapters "
                    "(ptuning, prefix, prompt_tuning) cannot be merged.")
    exp.add_argument("--adapter", required=True, metavar="DIR", help=ADAPTER_HELP)
    exp.add_argument("--out", metavar="OUT", help="write the adapter folder (with tokenizer and chat template) here")
    exp.add_argument("--merge", metavar="OUT", help="write the base model with the adapter merged in here")
    exp.add_argument("--dequantize", action="store_true",
                     help="with --merge and a 4bit/8bit base (model.quantization): merge into the unquantised base "
                          "in model.dtype (merging into quantised weights is lossy, so it is refused without this)")
    exp.add_argument("--force", action="store_true", help="replace an OUT folder that already holds files")
    exp.add_argument("--device", default="cpu", help="where to load and merge the model (cpu, cuda:0)")
    exp.set_defaults(fn=_cmd_export)
    chat = sub.add_parser(
        "chat", help="chat with a trained adapter in the terminal (multi-turn; /reset, /exit)",
        description="Reads user lines from stdin and streams greedy answers, keeping the conversation in the "
                    "prompt (the job's chat template and system prompt). /reset forgets the conversation; "
                    "/exit or end of input (Ctrl-D) leaves.")
    chat.add_argument("--adapter", required=True, metavar="DIR", help=ADAPTER_HELP)
    chat.add_argument("--system", metavar="TEXT",
                      help="system prompt instead of the job's data.system_prompt ('' for none)")
    chat.add_argument("--max-new-tokens", type=positive_int, metavar="N", help="answer length cap (default: the job's "
                                                                      "eval.max_new_tokens, else 256)")
    chat.add_argument("--repetition-penalty", type=float, help="default: the job's eval.repetition_penalty, else 1.1")
    chat.add_argument("--device", default="cpu")
    chat.set_defaults(fn=_cmd_chat)
    ev = sub.add_parser(
        "eval", help="score trained adapters, or their base model, on any JSONL test files, side by side",
        description="Scores each adapter (and with --base the base model) on each --test file with the job's eval "
                    "settings (the first adapter's run config.yaml, eval: section; key=value overrides them) and "
                    "the prompt settings it was trained with. Writes metrics.json and predictions.jsonl per column "
                    "and test file into a new folder, and prints a table per test file: every column side by side, "
                    "and each difference against the first column (the base model with --base) with its paired "
                    "bootstrap 95% interval over the generated questions. --lm-eval TASKS also runs "
                    "lm-evaluation-harness tasks on each column (lm-eval's prompts, metrics and standard errors).")
    ev.add_argument("items", nargs="*", metavar="RUN_DIR_OR_ADAPTER",
                    help=f"{ADAPTER_HELP}; all of one base model. Then key=value overrides: eval.* (e.g. "
                         "eval.max_samples=50), data.system_prompt, data.max_seq_len, data.max_test_samples, data.question_field, "
                         "data.answer_field")
    ev.add_argument("--base", action="store_true",
                    help="also score the base model alone (the first column); with a job YAML instead of adapters, "
                         "score that job's base model only")
    ev.add_argument("--test", action="append", metavar="FILE",
                    help="JSONL file of question/answer rows (repeatable)")
    ev.add_argument("--lm-eval", action="append", metavar="TASKS",
                    help="also run EleutherAI lm-evaluation-harness tasks on each column (comma-separated task, "
                         "group or tag names, or task YAML files; repeatable), offline; pip install "
                         "'fedpeft[lm-eval]'. Results in lm_eval.json and a table")
    ev.add_argument("--lm-eval-include", action="append", metavar="DIR",
                    help="folder of your own lm-eval task YAML files (repeatable); relative data_files in a YAML "
                         "are read from its folder")
    ev.add_argument("--lm-eval-limit", type=positive_int, metavar="N",
                    help="score only the first N documents of each lm-eval task (for a quick look)")
    ev.add_argument("--out", metavar="DIR", help="new or empty folder for the results (default: eval-<time> beside "
                                                 "the first run)")
    ev.add_argument("--device", help="cpu or cuda:N (default: the job's model.devices, first one)")
    ev.set_defaults(fn=_cmd_eval, trailing_items=True)
