"""File names and row keys of benchmark jobs, defined once (see also :mod:`fedpeft.constants`).

A benchmark job folder ``<workspace>/<job>/`` holds one folder per test case,
``<algorithm>/<uuid>/`` (a normal run directory plus :data:`TESTCASE_FILE`), and:

* :data:`PLAN_FILE`: what the leaderboard needs to rebuild itself (metric columns, sort order).
* :data:`RANK_DIR` with the CSV and Markdown leaderboards.
* :data:`REPORT_FILE`: the offline HTML report.
"""

TESTCASE_FILE = "testcase.json"
PLAN_FILE = "benchmark.json"
RANK_DIR = "rank"
ALL_RANK = "all_rank"  # + .csv / .md
SELECTED_RANK = "selected_rank"
REPORT_FILE = "report.html"

PARADIGM_FEDERATED = "federatedlearning"
PARADIGM_BASELINE = "baseline"

# Baselines a job may ask for; each is also the folder name of its test cases.
ZERO_SHOT = "zero_shot"
LOCAL_ONLY = "local_only"
CENTRALIZED = "centralized"
BASELINES = (ZERO_SHOT, LOCAL_ONLY, CENTRALIZED)

# Row kinds in testcase.json (federated test cases and the three baselines).
KIND_FEDERATED = "federated"

# Extra leaderboard columns beyond Ianvs's (in this order, before time and url).
COL_ROUNDS = "rounds"
COL_CLIENTS = "clients"
COL_TRAINABLE = "trainable_parameters"
COL_BYTES_PER_ROUND = "bytes_per_round"
COL_BYTES_PER_UPDATE = "bytes_per_update"  # one client's fp32 update (summary.json update_bytes)
COL_WALL_SECONDS = "wall_seconds"
COL_PEAK_MEMORY = "peak_memory_mb"
COL_PEAK_GPU_MEMORY = "peak_gpu_memory_mb"
COL_HELDOUT_LOSS = "heldout_loss"
COL_PCT_CENTRALIZED = "pct_of_centralized"
COL_EPSILON = "epsilon"  # privacy budget spent (summary.json); inf: trained without DP
COL_DP = "dp"  # the DP level and delta the epsilon is at, e.g. "client, δ=1e-05"; "none"
COL_SITE_MEAN_LOSS = "site_mean_heldout_loss"  # per-site scores (data.client_test_ratio): mean over sites
COL_SITE_WORST_LOSS = "site_worst_heldout_loss"  # ... and the worst site
COL_PERSONAL_MEAN_LOSS = "personal_site_mean_heldout_loss"  # after eval.site_finetune_steps on each site
COL_PERSONAL_WORST_LOSS = "personal_site_worst_heldout_loss"
SITE_COLUMNS = {COL_SITE_MEAN_LOSS: "site_mean/heldout_loss", COL_SITE_WORST_LOSS: "site_worst/heldout_loss",
                COL_PERSONAL_MEAN_LOSS: "site_mean/personal/heldout_loss",
                COL_PERSONAL_WORST_LOSS: "site_worst/personal/heldout_loss"}  # column: key in summary final
COL_VS_ZERO_SHOT = "vs_zero_shot"  # first metric minus zero-shot's, with its paired bootstrap 95 % CI
COL_VS_CENTRALIZED = "vs_centralized"  # ... minus the centralised baseline's
COL_LOSS_VS_ZERO_SHOT = "loss_vs_zero_shot"  # held-out loss minus zero-shot's, paired CI from item_scores.json
COL_LOSS_VS_CENTRALIZED = "loss_vs_centralized"
COL_MCQ_VS_ZERO_SHOT = "mcq_vs_zero_shot"  # multiple-choice accuracy (eval.mcq) minus zero-shot's
COL_MCQ_VS_CENTRALIZED = "mcq_vs_centralized"
PAIRED_COLUMNS = (COL_VS_ZERO_SHOT, COL_VS_CENTRALIZED, COL_LOSS_VS_ZERO_SHOT, COL_LOSS_VS_CENTRALIZED,
                  COL_MCQ_VS_ZERO_SHOT, COL_MCQ_VS_CENTRALIZED)
EXTRA_COLUMNS = (COL_ROUNDS, COL_CLIENTS, COL_TRAINABLE, COL_BYTES_PER_UPDATE, COL_BYTES_PER_ROUND, COL_WALL_SECONDS,
                 COL_PEAK_MEMORY, COL_PEAK_GPU_MEMORY, COL_HELDOUT_LOSS, *SITE_COLUMNS, COL_PCT_CENTRALIZED,
                 *PAIRED_COLUMNS, COL_EPSILON, COL_DP)
# Columns where smaller is better (default sort direction and the 'worst client' rule).
ASCENDING_COLUMNS = frozenset({COL_BYTES_PER_ROUND, COL_BYTES_PER_UPDATE, COL_WALL_SECONDS, COL_PEAK_MEMORY, COL_PEAK_GPU_MEMORY,
                               COL_HELDOUT_LOSS, COL_TRAINABLE, COL_EPSILON, *SITE_COLUMNS})
# The privacy entry of a run's summary.json and round records (written by fedpeft.rounds).
KEY_PRIVACY = "privacy"
