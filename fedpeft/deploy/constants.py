"""Keys and file names of the Flower deployment, defined once.

Deployment-only keys live here; keys shared with the in-process runtime (``num_examples``,
``client_id``, ``bytes_down``, ...) come from :mod:`fedpeft.constants`.
"""

# Records inside a Message's RecordDict (server <-> site).
RECORD_STATE = "state"  # ArrayRecord: the trainable state (float32), keys = State keys
RECORD_METRICS = "metrics"  # MetricRecord: num_examples, train_loss, seconds, ...
RECORD_CONFIG = "config"  # ConfigRecord: what the site needs for this round / its answer

# ConfigRecord keys of a training message (server -> site). Also FitIns config keys (SecAgg+).
KEY_SERVER_ROUND = "server_round"
KEY_SITE = "site"  # the site name the server expects (a site refuses a message for another)
KEY_SEED = "seed"  # fedpeft.rounds.client_seed(cfg, round, site index)
KEY_JOB = "job"  # JSON: the parts of the job config a site needs (see fedpeft.deploy.wire)
KEY_SECURE = "secure"  # set by the site's ClientApp: the update goes through SecAgg+
KEY_RANK = "rank"  # this site's LoRA rank (federation.client_ranks); absent: the whole adapter
KEY_SHARES = "shares"  # sites sampled this round (client-level DP: each adds its share of the noise)
KEY_TIMEOUT = "timeout_s"  # the round timeout: a site gives up training after this long
KEY_STATE_KEYS = "state_keys"  # SecAgg+ only: State keys, "\n"-joined (legacy arrays are unnamed)
KEY_CLIP = "secagg_clipping_range"  # SecAgg+ only: lets a site report clipped values
KEY_MAX_WEIGHT = "secagg_max_weight"
KEY_CLIPPED = "secagg_clipped"  # metric: values a site clipped before SecAgg+ (should be 0)
KEY_TASK = "task"  # absent: train; TASK_EVALUATE: score the global adapter on the site's own slice
TASK_EVALUATE = "evaluate"
KEY_ZERO_SHOT = "zero_shot"  # evaluate: the base model alone (the state record is empty)
KEY_QUERY = "query"  # QUERY message: what the server asks
QUERY_SITE_NAME = "site-name"  # ... the site's name (answered as KEY_SITE)

# Run config of the generated Flower app ([tool.flwr.app.config]): everything else is in files.
RUN_DIR = "run-dir"  # absolute path of the run folder the ServerApp writes
ALLOW_CONFIG_CHANGE = "allow-config-change"  # comma-joined dotted keys (fedpeft server --resume)

# Node config (`flower-supernode --node-config FILE.toml`), written by `fedpeft client`.
NODE_SITE_NAME = "site-name"
NODE_DATA_PATH = "data-path"
NODE_DEVICE = "device"  # "" (job's model.devices) or e.g. "cuda:0"
NODE_TRAINER_SOCKET = "trainer-socket"  # Unix socket of the site's trainer (fedpeft client)
NODE_TRAINER_KEY = "trainer-key"  # file (0600) holding that socket's authentication key

# Files of a deployment inside the run folder (besides the simulation's files).
DEPLOY_CONFIG_FILE = "deploy.yaml"  # resolved deployment config (sites, TLS, SecAgg+, timeouts)
FLOWER_DIR = "flower"  # FLWR_HOME of every process, logs, the generated app, status
SITE_NODES_FILE = "site-nodes.json"  # {site name: node id} of sites registered with keys
STATUS_FILE = "status.json"  # {"status": "running" | "completed" | "failed", "error": ...}
LOGS_DIR = "logs"
SERVERAPP_LOG = "serverapp.log"
SUPERLINK_LOG = "superlink.log"

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"

# Environment of every Flower process (see docs/deploy-notes.md, section 2).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # else a background HTTPS call to api.flower.ai
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # default 1 s; Fleet/Grid polls are fixed 3 s
    "PYTHONUNBUFFERED": "1",
}
