"""The settings of the served tiny run, shared by the serving tests."""

SYSTEM = "Answer in one short sentence."
PENALTY, NEW_TOKENS = 1.3, 8  # the job's eval settings, which export and chat take over
