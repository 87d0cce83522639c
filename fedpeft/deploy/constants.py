"""Keys of the Flower deployment: message records, run config, node config, output files.

Deployment-only keys live here until the lead merges them into :mod:`fedpeft.constants`;
keys shared with the in-process runtime (``num_examples``, ``client_id``, ...) come from there.
"""

# Records inside a Message's RecordDict (server <-> client).
RECORD_STATE = "state"  # ArrayRecord: the trainable state (float32), keys = State keys
RECORD_METRICS = "metrics"  # MetricRecord: num_examples, train_loss, seconds, ...
RECORD_CONFIG = "config"  # ConfigRecord: round, client-side hyperparameters

KEY_SERVER_ROUND = "server_round"

# Run config ([tool.flwr.app.config] of the generated pyproject.toml; `flwr run --run-config`).
# Flower's convention is dashed keys; values must be TOML scalars.
RUN_NUM_ROUNDS = "num-server-rounds"
RUN_MIN_NODES = "min-nodes"  # wait for this many SuperNodes before round 1
RUN_NODE_WAIT_S = "node-wait-s"  # ... for at most this long
RUN_ROUND_TIMEOUT_S = "round-timeout-s"  # grid.send_and_receive timeout per round/stage
RUN_MIN_REPLIES = "min-replies"  # a round with fewer successful replies raises RoundError
RUN_AGGREGATION = "aggregation"  # registered aggregator name (fedpeft.aggregators)
RUN_OUTPUT_DIR = "output-dir"  # where the ServerApp writes summary.json / metrics.jsonl
RUN_SECAGG = "secure-aggregation"  # true: SecAgg+ (server sees only the weighted mean)
RUN_SECAGG_CLIP = "secagg-clipping-range"  # |num_examples/max_weight * param| must stay below
RUN_SECAGG_QRANGE = "secagg-quantization-range"  # integer levels over [-clip, clip]
RUN_SECAGG_MAX_WEIGHT = "secagg-max-weight"  # num_examples must not exceed this
RUN_INIT_SEED = "init-seed"  # seed of the placeholder initial state

# Node config (`flower-supernode --node-config 'data-path="..." client-id="..."'`).
NODE_DATA_PATH = "data-path"
NODE_CLIENT_ID = "client-id"

# Files the ServerApp writes into RUN_OUTPUT_DIR.
DEPLOY_SUMMARY_FILE = "summary.json"
DEPLOY_METRICS_FILE = "metrics.jsonl"
DEPLOY_STATE_FILE = "global_state.safetensors"
