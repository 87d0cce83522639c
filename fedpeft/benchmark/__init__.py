"""Benchmark jobs: grids of federated test cases, baselines, a ranked leaderboard and a report.

A job is written either in the KubeEdge Ianvs format (``benchmarkingjob.yaml`` + ``testenv.yaml``
+ ``algorithm.yaml``, see :mod:`fedpeft.benchmark.ianvs`) or as one native YAML with a ``grid:``
(:mod:`fedpeft.benchmark.native`). Both become one :class:`~fedpeft.benchmark.plan.BenchmarkPlan`
(a list of validated :class:`~fedpeft.config.JobConfig` test cases) that
:func:`~fedpeft.benchmark.runner.run_benchmark` executes::

    plan = load_plan("examples/ianvs/benchmarkingjob.yaml")
    run_benchmark(plan)   # <workspace>/<job>/{<algorithm>/<uuid>/, rank/, report.html}
"""

from fedpeft.benchmark.plan import BenchmarkPlan, TestCase, detect_format, load_plan

__all__ = ["BenchmarkPlan", "TestCase", "detect_format", "load_plan", "run_benchmark"]


def run_benchmark(*args, **kwargs):  # noqa: ANN002, ANN003 - thin lazy alias (keeps imports light)
    """See :func:`fedpeft.benchmark.runner.run_benchmark`."""
    from fedpeft.benchmark.runner import run_benchmark as run

    return run(*args, **kwargs)
