"""Run the quick benchmark set and rewrite the tables in ``BENCHMARKS.md``.

Each script runs in its own process (fresh memory, its own thread settings) and writes
``bench/results/NAME.json``; then every result found, the long quality run's included, is
pasted into ``BENCHMARKS.md`` between its markers::

    <!-- bench:NAME:start -->  ...generated...  <!-- bench:NAME:end -->

Text outside the markers is kept as written. A result without markers in the file is appended
as a new section.

    python bench/run_all.py                       # quick set (all but quality), then BENCHMARKS.md
    python bench/run_all.py --only swap generation
    python bench/run_all.py --render-only         # only rewrite BENCHMARKS.md from bench/results/
    python bench/quality.py                       # the long ones, run on their own (about an hour each
    python bench/medquad.py                       #   and 35 min), then --render-only
    python bench/privacy.py                       # DP vs utility, canary exposure (about 35 min)
    python bench/server_memory.py                 # server RSS of a round, 2 to 32 clients (about 2 min)
    python bench/robust.py                        # robust rules vs a scaled update (about 15 min)
    python bench/lora_aggregation.py --suite rules        # fedavg, ffa_lora, svd, ranks vs centralised (~1 h)
    python bench/lora_aggregation.py --suite compression  # fp32/fp16/int8/nf4/top-k bytes and loss (~1 h)
    python bench/peft_methods.py                  # every PEFT method, 2 rounds each (about 10 min)
    python bench/memory_breakdown.py              # where a LoRA round's memory goes; a 1B-13B plan (~12 min)
    python bench/precision_cpu.py                 # fp32, bf16, 8-bit, 4-bit bases trained on CPU (~10 min)
    python bench/eval_speed.py                    # fedpeft's evaluation vs the seed's predict loop (~12 min)
    python bench/answer_selection.py              # MCQ, held-out loss, ROUGE-L, per-site, personalised (~75 min)
    python bench/lora_aggregation.py --suite schedule     # rounds x steps, server learning rates (~1 h)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS_DIR, fmt_seconds, load_result, machine_line  # noqa: E402

# The quick set, in run order (scaling reads overhead's and communication's results).
QUICK: dict[str, list[str]] = {
    "communication": [],
    "swap": [],
    "generation": [],
    "generation_paths": [],
    "memory": [],
    "overhead": ["--default-steps", "4"],
    "scaling": [],
}
# Order of the sections in BENCHMARKS.md, with their headings for a file without markers.
SECTIONS = {
    "overhead": "1. Federation overhead",
    "memory": "2. Memory ceiling",
    "swap": "3. Adapter swap vs reload",
    "generation": "4. Evaluation throughput",
    "generation_paths": "Generation paths: P-Tuning and merged LoRA",
    "communication": "5. Communication",
    "quality": "6. Learning quality",
    "scaling": "7. Scaling on paper",
    "medquad": "8. The MedQuAD run",
    "faults": "9. Fault suite",
    "privacy": "Privacy",
    "server_memory": "LoRA-aware aggregation: server memory",
    "robust": "Robust aggregation: a site sending a scaled update",
    "lora_aggregation_rules": "LoRA-aware aggregation: rules and ranks",
    "lora_aggregation_compression": "Update compression",
    "peft_methods": "PEFT methods side by side",
    "memory_breakdown": "Memory breakdown and a plan for bigger bases",
    "precision_cpu": "Base precisions on CPU",
    "generation_growth": "Batched generation at long answers",
    "eval_speed": "Evaluation speed vs the seed's predict loop",
    "answer_selection": "MedQuAD answer selection, per-site scores and the personalised arm",
    "lora_aggregation_schedule": "LoRA-aware aggregation: rounds x steps and server learning rates",
}
LONG = {"quality": "python bench/quality.py", "medquad": "python bench/medquad.py",  # run on their own
        "faults": "python bench/faults.py", "privacy": "python bench/privacy.py",
        "server_memory": "python bench/server_memory.py", "robust": "python bench/robust.py",
        "lora_aggregation_rules": "python bench/lora_aggregation.py --suite rules",
        "lora_aggregation_compression": "python bench/lora_aggregation.py --suite compression",
        "peft_methods": "python bench/peft_methods.py", "memory_breakdown": "python bench/memory_breakdown.py",
        "precision_cpu": "python bench/precision_cpu.py",
        "generation_growth": "python bench/generation_growth.py", "eval_speed": "python bench/eval_speed.py",
        "answer_selection": "python bench/answer_selection.py",
        "lora_aggregation_schedule": "python bench/lora_aggregation.py --suite schedule"}
BENCHMARKS_MD = REPO / "BENCHMARKS.md"


def run_script(name: str, args: list[str], results_dir: Path) -> float:
    """Run ``bench/NAME.py`` in a fresh process; return its wall time. Raises on failure."""
    extra = [] if results_dir == RESULTS_DIR else ["--results-dir", str(results_dir)]
    cmd = [sys.executable, str(REPO / "bench" / f"{name}.py"), *args, *extra]
    print(f"\n=== {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.perf_counter() - start


def render_section(result: dict) -> str:
    """The Markdown between one script's markers: provenance, then its table."""
    goal = result.get("goal") or {}
    verdict = "" if not goal else f" · **Goal:** {goal['text']} → **{'met' if goal.get('met') else 'missed'}**"
    return (
        f"Command: `{result['command']}` · {result['date']} · ran {fmt_seconds(result['seconds'])} · "
        f"load average (1/5/15 min) {result['loadavg_start']} before, {result['loadavg_end']} after{verdict}\n\n"
        f"Machine: {machine_line(result['machine'])}\n\n"
        f"{result['markdown'].strip()}"
    )


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def update_markdown(text: str, sections: dict[str, str]) -> str:
    """Replace each ``name``'s marked block in ``text``; append the ones without markers."""
    for name, body in sections.items():
        start, end = _markers(name)
        block = f"{start}\n{body}\n{end}"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text, count=1)
        else:
            text = text.rstrip("\n") + f"\n\n## {SECTIONS.get(name, name)}\n\n{block}\n"
    return text


def _pct_range(values: list[float]) -> str:
    return f"{100 * min(values):+.1f} … {100 * max(values):+.1f} %"


def _x_range(values: list[float]) -> str:
    return f"{min(values):.0f}× … {max(values):.0f}×"


def _privacy_headline(rows: list[dict], r: int) -> str:
    """Held-out loss per DP setting, then planted canary exposure at r without and with example-level DP."""
    def name(x: dict) -> str:
        return "no DP" if x["level"] == "none" else f"{x['level']} ε {x['epsilon']:.2g}"

    at_r = [x for x in rows if x["level"] != "none" or x["repetitions"] == r]
    zero = next(x["zero_shot"] for x in rows if x.get("zero_shot"))
    loss = ", ".join([f"zero-shot {zero['heldout_loss']:.2f}"] + [f"{name(x)} {x['heldout_loss']:.2f}" for x in at_r])
    bits = ", ".join(f"{name(x)} {x['planted_exposure']:.1f}" for x in at_r if "planted_exposure" in x)
    return f"held-out loss {loss}; planted canary exposure at r={r}: {bits} bits (chance ≈ 1.4)"


def _server_memory_headline(goal: dict) -> str:
    """Peak RSS growth per server arm, fewest to most clients."""
    g = goal["growth"]
    return f"{g['streaming']['from']} → {g['streaming']['to']} clients: " + "; ".join(
        f"{arm} {100 * x['growth']:+.1f} % ({x['per_client_bytes'] / 1e6:.1f} MB/client)" for arm, x in g.items())


def _robust_headline(rows: list[dict]) -> str:
    """Final held-out loss of the clean run and of each rule under attack."""
    clean = rows[0]
    attacked = ", ".join(f"{x['aggregation']} {x['final']:.3g}" for x in rows if x["attacked"])
    return f"final held-out loss: clean {clean['final']:.2f} (zero-shot {clean['zero_shot']:.2f}); attacked: {attacked}"


def _peft_methods_headline(rows: list[dict]) -> str:
    """Held-out loss change from zero-shot per method, then the smallest and largest update."""
    methods = [x for x in rows[1:] if x.get("bytes_per_update")]
    loss = ", ".join(f"{x['method']} {x['vs_zero_shot']:+.3f}" if x.get("vs_zero_shot") is not None
                     else f"{x['method']} failed" for x in rows[1:])
    if not methods:
        return f"held-out loss vs zero-shot: {loss}"
    small, large = (f(methods, key=lambda x: x["bytes_per_update"]) for f in (min, max))
    return (f"held-out loss vs zero-shot: {loss}; bytes per update {small['method']} "
            f"{small['bytes_per_update'] / 1e3:.3g} kB … {large['method']} {large['bytes_per_update'] / 1e3:.3g} kB")


def _memory_breakdown_headline(r: dict) -> str:
    """Peak RSS of the round per arm vs before, and of the held-out loss."""
    arms = ", ".join(f"{x['arm']} {100 * x['vs_before']:+.0f} %" for x in r["rows"] if x["arm"] != "before")
    held = next((x for x in r.get("heldout", []) if x["arm"] == "now"), None)
    return f"round peak RSS vs before: {arms}" + (f"; held-out loss {100 * held['vs_before']:+.0f} %" if held else "")


HEADLINES = {  # one line of what each result measured, for the summary table
    "overhead": lambda r: (f"outside the optimizer steps: {_pct_range([x['outside_steps'] for x in r['rows']])} "
                           f"of the run; wall ratio {_pct_range([x['overhead'] for x in r['rows']])}"),
    "memory": lambda r: "; ".join(f"{m}: {100 * g:+.1f} %" for m, g in r["goal"]["growth"].items()),
    "swap": lambda r: f"{_x_range([x['ratio'] for x in r['rows']])} (swap in); {r['goal']['min_ratio_out_and_in']:.0f}× "
                      "counting the copy out",
    "generation": lambda r: f"{r['goal']['best_speedup']:.1f}× at batch {r['goal']['best_batch_size']}",
    "generation_paths": lambda r: ", ".join(f"{x['path']} {x['median_tok_s']:.0f}" for x in r["rows"]) + " tok/s",
    "communication": lambda r: f"update {_x_range([x['ratio'] for x in r['rows']])} smaller than the model",
    "quality": lambda r: ("FedAvg-LoRA ÷ centralised ROUGE-L (per seed): IID "
                          + ", ".join(f"{x:.2f}" for x in r["goal"]["fedavg_lora_iid_ratio"]) + "; non-IID "
                          + ", ".join(f"{x:.2f}" for x in r["goal"]["fedavg_lora_noniid_ratio"])),
    "scaling": lambda r: "; ".join(f"{x['sites']} sites: {x['round_s'] / 60:.1f} min/round" for x in r["rows"]),
    "medquad": lambda r: (f"ROUGE-L {r['rows'][0]['rougeL']:.3f} → {r['rows'][1]['rougeL']:.3f}, paired gain CI "
                          f"[{r['gain_ci'][0]:+.3f}, {r['gain_ci'][1]:+.3f}]; held-out loss "
                          f"{r['rows'][0]['heldout_loss']:.2f} → {r['rows'][1]['heldout_loss']:.2f}"),
    "faults": lambda r: f"{len(r['rows'])} cases: " + ", ".join(
        f"{k} {n}" for k, n in sorted(r["goal"]["counts"].items(), key=lambda kv: -kv[1])),
    "privacy": lambda r: _privacy_headline(r["rows"], r["repetitions_found"]),
    "server_memory": lambda r: _server_memory_headline(r["goal"]),
    "robust": lambda r: _robust_headline(r["rows"]),
    "lora_aggregation_rules": lambda r: "gap to centralised closed: " + ", ".join(
        f"{x['arm']} {100 * x['gap_closed']:.0f} %" for x in r["rows"] if x.get("gap_closed") is not None),
    "lora_aggregation_compression": lambda r: "bytes up ÷ fp32, held-out loss: " + ", ".join(
        f"{x['arm']} {x['fp32_up_ratio']:.1f}× {x['heldout_loss']:.4f}" for x in r["rows"] if x.get("fp32_up_ratio")),
    "peft_methods": lambda r: _peft_methods_headline(r["rows"]),
    "memory_breakdown": lambda r: _memory_breakdown_headline(r),
    "generation_growth": lambda r: ", ".join(f"{a} {g:.2f}×" for a, g in r["goal"]["gains"].items())
    + " batch 4 vs 1 (tok/CPU-s, 1024 new tokens)",
    "eval_speed": lambda r: ", ".join(
        f"{x['model']} {x['speedup_cpu']:.2f}× CPU ({x['speedup_wall']:.2f}× wall), {x['same']} answers equal"
        for x in r["rows"] if x.get("speedup_cpu")) + " (less time than the seed loop)",
    "answer_selection": lambda r: _answer_selection_headline(r),
    "lora_aggregation_schedule": lambda r: "gap to centralised (4 x 4) closed: " + ", ".join(
        f"{x['arm']} {100 * x['gap_closed']:.0f} %" for x in _schedule_gaps(r)),
    "precision_cpu": lambda r: "loss before → after, CPU s/step: " + ", ".join(
        f"{x['arm']} {x['before']:.2f} → {x['after']:.2f}, {x['cpu_per_step']:.1f}" if "after" in x else f"{x['arm']} failed"
        for x in r["rows"]),
}


def _schedule_gaps(r: dict, results_dir: Path = RESULTS_DIR) -> list[dict]:
    """The schedule suite's federated arms (``lora_aggregation_schedule_arms.json``: the lines its first run
    printed before it stopped) with the share of the zero-shot -> centralised gap each closes (point values)."""
    arms = load_result("lora_aggregation_schedule_arms", results_dir)
    base = {x["arm"]: x["heldout_loss"] for x in r["rows"]}
    zero, central = base["zero-shot"], next(v for k, v in base.items() if k.startswith("centralised"))
    return [{**x, "gap_closed": (zero - x["heldout_loss"]) / (zero - central)} for x in (arms or {}).get("rows", [])]


def _schedule_arms(r: dict, results_dir: Path) -> str:
    from fedpeft.tables import markdown_table

    rows = [[x["arm"], f"{x['heldout_loss']:.4f}", f"{100 * x['gap_closed']:.1f} %", str(x["optimizer_steps"]),
             f"{x['seconds']}"] for x in _schedule_gaps(r, results_dir)]
    arms = load_result("lora_aggregation_schedule_arms", results_dir) or {}
    return (markdown_table(["federated arm", "held-out loss", "gap closed (point)", "optimizer steps", "seconds"], rows)
            + f"\n\nFederated arms: `{arms.get('command')}` at commit {arms.get('commit')}, {arms.get('date')}, load "
            f"{arms.get('load_average')}; {arms.get('status')}")


def _answer_selection_headline(r: dict) -> str:
    zero, fed, cen = r["rows"][:3]
    sites = {x["site"]: x for x in r["sites"]}
    return (f"answer selection zero-shot {100 * zero['mcq']:.1f} %, FedAvg {100 * fed['mcq']:.1f} %, centralised "
            f"{100 * cen['mcq']:.1f} % (FedAvg ÷ centralised {fed['mcq_ratio']:.2f}); held-out loss gap closed "
            f"{100 * fed['gap_closed']:.0f} %; worst site's loss FedAvg {sites['worst']['FedAvg']:.3f} vs local-only "
            f"{sites['worst']['local-only']:.3f}; site-mean gap closed: FedAvg {100 * sites['mean']['gap_FedAvg']:.0f} %, "
            f"personalised {100 * sites['mean']['gap_personalised']:.0f} %")


def render_summary(results: dict[str, dict]) -> str:
    """The summary table: every result's goal, headline and verdict, with its date."""
    from fedpeft.tables import markdown_table

    rows = []
    for name, r in results.items():
        goal = r.get("goal") or {}
        verdict = "–" if not goal else ("met" if goal.get("met") else "**missed**")
        try:
            headline = HEADLINES[name](r) if name in HEADLINES else ""
        except (KeyError, IndexError, TypeError):  # a result written before its headline's keys existed
            headline = "(see its section)"
        rows.append([SECTIONS[name], goal.get("text", "–"), headline, verdict, r["date"]])
    return markdown_table(["section", "goal", "measured", "verdict", "date"], rows)


def render(results_dir: Path, path: Path) -> list[str]:
    """Rewrite the marked tables of ``path`` from ``results_dir``; return the names written."""
    sections, results = {}, {}
    for name in SECTIONS:
        result = load_result(name, results_dir)
        if result is not None:
            if name == "lora_aggregation_schedule":  # its federated arms come from the stopped first run
                result = {**result, "markdown": result["markdown"] + "\n\n" + _schedule_arms(result, results_dir)}
            sections[name] = render_section(result)
            results[name] = result
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if _markers("summary")[0] in text:
        sections["summary"] = render_summary(results)
    path.write_text(update_markdown(text, sections), encoding="utf-8")
    return list(sections)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(QUICK), help="run only these scripts")
    p.add_argument("--skip", nargs="+", choices=list(QUICK), default=[], help="do not run these")
    p.add_argument("--render-only", action="store_true", help="run nothing; rewrite BENCHMARKS.md")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--markdown", type=Path, default=BENCHMARKS_MD, help="the file to rewrite")
    args = p.parse_args(argv)
    failed = []
    if not args.render_only:
        for name in args.only or QUICK:
            if name in args.skip:
                continue
            try:
                took = run_script(name, QUICK[name], args.results_dir)
                print(f"=== {name}: {fmt_seconds(took)}", flush=True)
            except subprocess.CalledProcessError as e:
                failed.append(f"{name} (exit {e.returncode})")
    written = render(args.results_dir, args.markdown)
    print(f"\n{args.markdown}: tables rewritten for {', '.join(written) or 'nothing'}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
