"""Wire keys and file names, defined once and imported everywhere."""

# Files inside a run directory: workspace/<job>/<run-id>/
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PREDICTIONS_FILE = "predictions.jsonl"
PARTITIONS_FILE = "partitions.json"
PREDICTIONS_ZERO_SHOT_FILE = "predictions_zero_shot.jsonl"
SUMMARY_FILE = "summary.json"
FINAL_ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_STATE_FILE = "global_state.safetensors"
CHECKPOINT_META_FILE = "checkpoint.json"
CHECKPOINT_SERVER_OPT_FILE = "server_optimizer.pt"
LATEST_CHECKPOINT_FILE = "latest"
LOCK_FILE = ".lock"  # held by the one process writing into a run folder
LOCK_HOLDER_FILE = ".lock-holder"  # who holds it (pid, host, since), for the error a second writer gets

# Files written by `fedpeft data split`.
SPLIT_TRAIN_FILE = "train.jsonl"
SPLIT_TEST_FILE = "test.jsonl"

# Keys of metrics.jsonl records and of messages between server and clients.
KEY_ROUND = "round"
KEY_EVENT = "event"
KEY_CLIENT_ID = "client_id"
KEY_NUM_EXAMPLES = "num_examples"
KEY_TRAIN_LOSS = "train_loss"
KEY_SECONDS = "seconds"
KEY_DEVICE = "device"
KEY_STEPS = "steps"
KEY_BYTES_DOWN = "bytes_down"
KEY_BYTES_UP = "bytes_up"
KEY_EVAL = "eval"
KEY_HELDOUT_LOSS = "heldout_loss"
KEY_GEN_TOKENS_PER_S = "gen_tokens_per_s"

EVENT_ROUND = "round"
EVENT_EVAL = "eval"
EVENT_SETUP = "setup"

# Environment variable pointing at the model cache (GGUF -> safetensors conversions).
ENV_CACHE_DIR = "FEDPEFT_CACHE"

# Example-level DP metrics of one client's round (fedpeft.privacy.example_level)
KEY_DP_STEPS = "dp_steps"
KEY_DP_SAMPLE_RATE = "dp_sample_rate"
KEY_DP_NOISE = "dp_noise_multiplier"
KEY_DP_EXAMPLES = "dp_examples"  # examples drawn over the round (Poisson: varies around q * n * steps)
KEY_EPSILON = "epsilon"
