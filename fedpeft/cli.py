"""Command line: ``fedpeft run | validate | demo | data split | data mcq | generate | export | chat | eval | audit``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from importlib import resources
from pathlib import Path

from fedpeft.errors import FedPeftError, RunInterrupted

log = logging.getLogger("fedpeft")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        datefmt="[%X]", handlers=[RichHandler(show_path=False, markup=False)])
    for noisy in ("httpx", "urllib3", "filelock", "flwr", "absl"):  # absl: rouge-score's "Using default tokenizer."
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_validate(args: argparse.Namespace) -> int:
    from fedpeft.config import load_config

    if _is_benchmark(args.config):  # what `fedpeft run` accepts, `validate` checks: every test case
        from fedpeft.benchmark import load_plan

        from fedpeft.benchmark.plan import settings_label
        from fedpeft.preflight import preflight_cases

        plan = load_plan(args.config, args.overrides)
        cases = [(f"{i + 1}: {settings_label(c.settings)}", c.cfg) for i, c in enumerate(plan.cases)]
        for note in preflight_cases(args.config, cases):
            print(f"note: {note}")
        print(f"{args.config}: OK (benchmark {plan.name!r}: {len(plan.cases)} test cases, "
              f"baselines: {', '.join(plan.baselines) or 'none'})")
        return 0
    from fedpeft.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    for note in preflight(args.config, cfg):  # data files, model name, target_modules
        print(f"note: {note}")
    print(f"{args.config}: OK (job {cfg.job!r}: {cfg.peft.method} x {cfg.federation.aggregation.name}, "
          f"{cfg.federation.num_clients} clients, {cfg.federation.rounds} rounds)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from fedpeft.benchmark.baselines import resume_baseline
    from fedpeft.config import load_config
    from fedpeft.simulation import run_job
    from fedpeft.results import print_results

    if getattr(args, "baseline", None):  # `fedpeft demo` has no --baseline
        return _cmd_baseline(args)
    if not args.resume and _is_benchmark(args.config):  # Ianvs files or a native grid
        return _cmd_benchmark(args)
    if getattr(args, "dry_run", False) and not args.resume:
        return _cmd_validate(args)
    cfg = None if args.resume else load_config(args.config, args.overrides)
    allow = tuple(getattr(args, "allow_config_change", None) or ())
    run = (args.resume and resume_baseline(Path(args.resume), allow)) or run_job(cfg, resume=args.resume,
                                                                                  allow_config_change=allow)
    print_results(run.path)
    if (cfg or load_config(run.path / "config.yaml")).audit.canaries:  # `audit:` in the job: audit it now
        from fedpeft.audit.report import audit_run, audit_tables, report_path

        print(audit_tables([audit_run(run.path)]) + f"\ncanary audit: {report_path(run.path)}")
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from fedpeft.benchmark.baseline_command import print_baseline, run_baseline
    from fedpeft.benchmark.baselines import check_baseline
    from fedpeft.config import load_config
    from fedpeft.errors import ConfigError

    try:
        check_baseline(args.baseline)
    except ConfigError as e:
        raise ConfigError(f"--baseline: {e}") from None
    if args.resume:
        raise ConfigError("--baseline starts a new baseline run; to continue one, give its folder alone: "
                          f"fedpeft run --resume RUN_DIR (it knows its arm), or start again: fedpeft run JOB.yaml "
                          f"--baseline {args.baseline}")
    if _is_benchmark(args.config):
        raise ConfigError(f"{args.config} is a benchmark file, which lists its own baselines (baselines: [...]); "
                          "--baseline takes a native job YAML")
    if getattr(args, "dry_run", False):
        return _cmd_validate(args)
    runs = run_baseline(load_config(args.config, args.overrides), args.baseline)
    print_baseline(runs, args.baseline)
    return 0


def _is_benchmark(path: str) -> bool:
    from fedpeft.benchmark import detect_format

    return detect_format(path) in ("ianvs", "grid")


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from fedpeft.benchmark import load_plan, run_benchmark

    plan = load_plan(args.config, args.overrides)
    if getattr(args, "dry_run", False):
        for i, case in enumerate(plan.cases, 1):
            print(f"{i}. {case.algorithm}: {case.label()}")
        print(f"baselines: {', '.join(plan.baselines) or 'none'}; job folder: {plan.job_dir}")
        return 0
    result = run_benchmark(plan)
    print(f"leaderboard: {result.job_dir / 'rank'}\nreport: {result.job_dir / 'report.html'}")
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from fedpeft.benchmark.leaderboard_command import print_leaderboards

    return print_leaderboards(args.workspace, args.sort_by, show_all=args.all)


def demo_config_path() -> Path:
    """The shipped demo config (offline sample data, default model)."""
    return Path(str(resources.files("fedpeft").joinpath("configs/demo.yaml")))


def _cmd_demo(args: argparse.Namespace) -> int:
    args.config = str(demo_config_path())
    args.resume = None
    return _cmd_run(args)


def _cmd_split(args: argparse.Namespace) -> int:
    from fedpeft.data.split import split_file

    counts = split_file(args.input, args.out, args.test_ratio, args.seed, drop_fields=tuple(args.drop or ()),
                        group_field=args.group_by)
    print(json.dumps(counts))
    return 0


def _cmd_mcq(args: argparse.Namespace) -> int:
    from fedpeft.data.mcq_command import mcq_file

    print(json.dumps(mcq_file(args.input, args.out, distractors=args.distractors, seed=args.seed, max_items=args.max)))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from fedpeft.generation import generate_answers
    from fedpeft.serve.saved import load_model, open_adapter

    saved = open_adapter(args.adapter)
    model, tok = load_model(saved, args.device)
    answers = generate_answers(model, tok, args.questions, system_prompt=saved.system_prompt,
                               max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                               progress=False)
    for q, a in zip(args.questions, answers):
        print(f"Q: {q}\nA: {a}\n")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from fedpeft.audit.report import audit_run, audit_tables, report_path

    reports = [audit_run(args.run_dir, candidates=args.candidates)]
    if args.compare:
        reports.append(audit_run(args.compare, candidates=args.candidates))
    print(audit_tables(reports))
    print(f"\nreport: {report_path(args.run_dir)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpeft", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated job from a YAML config")
    run.add_argument("config", nargs="?", help="job YAML (native format)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.learning_rate=1e-4")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    run.add_argument("--allow-config-change", metavar="KEY", action="append",
                     help="with --resume: a dotted key of the run's config.yaml that may differ from its checkpoint's "
                          "(e.g. federation.rounds to add rounds); repeatable")
    run.add_argument("--dry-run", action="store_true",
                     help="check the config and exit; a benchmark file also lists its test cases")
    run.add_argument("--baseline", metavar="NAME",
                     help="run one baseline arm of the job alone, as fedpeft benchmark does: zero_shot (the base "
                          "model), centralized (all clients' rows as one client, same optimizer steps) or local_only "
                          "(each client alone: one run per client); run ids name the baseline")
    run.set_defaults(fn=_cmd_run)
    val = sub.add_parser("validate", help="check a job or benchmark config and list every problem")
    val.add_argument("config", help="job YAML, benchmarkingjob.yaml (Ianvs format) or configs/benchmark-*.yaml")
    val.add_argument("overrides", nargs="*")
    val.set_defaults(fn=_cmd_validate)
    demo = sub.add_parser("demo", help="small federated LoRA job on the default model and shipped sample data")
    demo.add_argument("overrides", nargs="*")
    demo.set_defaults(fn=_cmd_demo)
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    split = data.add_parser("split", help="split a JSONL file into train.jsonl and test.jsonl")
    split.add_argument("input")
    split.add_argument("--out", required=True)
    split.add_argument("--test-ratio", type=float, default=0.1)
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--drop", action="append", help="field to remove from every row (repeatable)")
    split.add_argument("--group-by", help="keep each value of this field on one side (e.g. focus)")
    split.set_defaults(fn=_cmd_split)
    mcq = data.add_parser("mcq", help="make multiple-choice items (eval.mcq) from MedQuAD rows: each answer "
                                      "against answers of the same qtype on other topics")
    mcq.add_argument("input", help="JSONL rows with question, answer, qtype and focus (e.g. MedQuAD test.jsonl)")
    mcq.add_argument("--out", required=True, help="the JSONL file of items to write")
    mcq.add_argument("--distractors", type=int, default=3, help="wrong options per question")
    mcq.add_argument("--seed", type=int, default=0)
    mcq.add_argument("--max", type=int, metavar="N", help="items for N rows at most (a seeded random subset)")
    mcq.set_defaults(fn=_cmd_mcq)
    gen = sub.add_parser("generate", help="answer questions with a trained global adapter")
    gen.add_argument("--adapter", required=True, metavar="DIR",
                     help="a run folder (workspace/<job>/<run-id>) or its adapter/ folder; the job's system "
                          "prompt and chat template apply")
    gen.add_argument("questions", nargs="+")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--repetition-penalty", type=float, default=1.1)
    gen.set_defaults(fn=_cmd_generate)
    from fedpeft.serve.cli import add_commands as add_serve_commands

    add_serve_commands(sub)  # export | chat
    audit = sub.add_parser("audit", help="canary memorisation audit of a run trained with audit.canaries > 0")
    audit.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (workspace/<job>/<run-id>)")
    audit.add_argument("--candidates", type=int, metavar="N",
                       help="random secrets each canary is ranked against (default: the job's audit.candidates)")
    audit.add_argument("--compare", metavar="DIR", help="another run with the same canaries (e.g. the job without DP), "
                                                        "shown side by side")
    audit.set_defaults(fn=_cmd_audit)
    bench = sub.add_parser("benchmark", help="run a benchmark job: Ianvs benchmarkingjob.yaml or a native grid")
    bench.add_argument("config", help="benchmarkingjob.yaml (Ianvs format) or configs/benchmark-*.yaml")
    bench.add_argument("overrides", nargs="*", help="key=value applied to every test case, e.g. eval.max_samples=8")
    bench.add_argument("--dry-run", action="store_true", help="list the test cases and exit")
    bench.set_defaults(fn=_cmd_benchmark)
    board = sub.add_parser("leaderboard", help="print the leaderboard of a benchmark job again")
    board.add_argument("workspace", help="the job folder (<workspace>/<job>) or a workspace holding jobs")
    board.add_argument("--sort-by", action="append", metavar="METRIC[:ascend|descend]",
                       help="sort by this column (repeatable; default direction: descend, ascend for losses/costs)")
    board.add_argument("--all", action="store_true", help="every row and column (all_rank), not the selection")
    board.set_defaults(fn=_cmd_leaderboard)
    from fedpeft.deploy.cli import add_commands as add_deploy_commands

    add_deploy_commands(sub)  # server | client | certs | keys (Flower deployment)
    return p


def _where(error: BaseException) -> str:
    """``file:line in function`` of the frame that raised ``error`` (a plugin's own file, say)."""
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    return f"raised at {frame.filename}:{frame.lineno} in {frame.name}" if frame else "no traceback"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a command with ``trailing_items`` (``eval``) also takes positional items after
    its options (``fedpeft eval RUN --test t.jsonl eval.max_samples=5``), which argparse alone refuses."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not getattr(args, "trailing_items", False) or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.items += extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _setup_logging(args.verbose)
    if args.command == "run" and not (args.config or args.resume):
        print("fedpeft run: give a CONFIG.yaml or --resume RUN_DIR", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except RunInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except (FedPeftError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug or a plugin's own error: one line, -v for the traceback
        if args.verbose:
            raise
        print(f"error: {type(e).__name__}: {e} ({_where(e)}; run with -v for the traceback)", file=sys.stderr)
        return 1


def entry() -> None:
    """The ``fedpeft`` command: :func:`main`, then exit.

    After Ctrl-C a worker thread may still be inside a torch kernel; a normal interpreter exit
    would then abort ("terminate called without an active exception", exit -6). The checkpoint
    and the lock are already settled, so the process leaves at once with 130.
    """
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    entry()
