"""Typed models of the three KubeEdge Ianvs files (``benchmarkingjob.yaml``, ``testenv.yaml``,
``algorithm.yaml``), as Ianvs's ``federated-llm/fedllm-peft`` example writes them.

Keys fedpeft does not use are listed in each model's ``IGNORED`` with the reason (reported once);
any other unknown key is an error naming the file, line and closest valid key
(:mod:`fedpeft.benchmark.schema`). :mod:`fedpeft.benchmark.ianvs` maps them onto JobConfig.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from fedpeft.benchmark.schema import FileModel, RankSpec, one_key_each

class AlgorithmRef(FileModel):
    name: str
    url: str


class TestObject(FileModel):
    type: Literal["algorithms"] = "algorithms"
    algorithms: list[AlgorithmRef] = Field(min_length=1)


class FedpeftSection(FileModel):
    """fedpeft-only settings (Ianvs has no place for them)."""

    # Ianvs has no baselines; by default the base model alone is one row, evaluated once per
    # distinct setup instead of at round 0 of every test case. [] drops it.
    baselines: list[str] = ["zero_shot"]
    config: dict[str, Any] = {}  # native JobConfig keys for every test case
    peft: dict[str, dict[str, Any]] = {}  # peft_method value -> its hyperparameters


class BenchmarkingJob(FileModel):
    IGNORED: ClassVar[dict[str, str]] = {"hard_example_mining_mode": "joint-inference paradigm only"}
    name: str
    workspace: str = "./workspace"
    testenv: str
    test_object: TestObject
    rank: RankSpec = RankSpec()
    fedpeft: FedpeftSection = FedpeftSection()


class BenchmarkingJobFile(FileModel):
    benchmarkingjob: BenchmarkingJob


class Dataset(FileModel):
    IGNORED: ClassVar[dict[str, str]] = {"name": "a label only"}
    train_data: str
    test_data: str | None = None  # None: hold out data.test_ratio of train_data


class NamedUrl(FileModel):
    name: str
    url: str | None = None


class TestEnv(FileModel):
    IGNORED: ClassVar[dict[str, str]] = {"model_eval": "fedpeft evaluates every test case on all metrics"}
    backend: str = "TORCH"
    dataset: Dataset
    metrics: list[NamedUrl] = Field(min_length=1)
    round: int = Field(ge=1)
    client_number: int = Field(ge=1)
    gpu_num: int | None = Field(None, ge=0)
    if_mode_llm: bool = True

    @field_validator("backend")
    @classmethod
    def _torch(cls, value: str) -> str:
        if value.lower() not in ("torch", "pytorch"):
            raise ValueError(f"fedpeft runs PyTorch only; set backend: TORCH (got {value!r})")
        return value

    @field_validator("if_mode_llm")
    @classmethod
    def _llm(cls, value: bool) -> bool:
        if not value:
            raise ValueError("fedpeft fine-tunes language models only; set if_mode_llm: true")
        return value


class TestEnvFile(FileModel):
    testenv: TestEnv


class FlDataSetting(FileModel):
    IGNORED: ClassVar[dict[str, str]] = {
        "train_ratio": "test rows come from test_data or fedpeft.config.data.test_ratio",
        "splitting_method": "partitioning is fedpeft.config.federation.partition (default iid)",
        "label_data_ratio": "every row has its answer",
        "data_partition": "partitioning is fedpeft.config.federation.partition (default iid)",
    }


class Module(FileModel):
    type: Literal["basemodel", "aggregation"]
    name: str
    url: str | None = None
    hyperparameters: Annotated[list[dict[str, Any]], one_key_each("{name: {values: [...]}}")] = []


class Algorithm(FileModel):
    paradigm_type: Literal["federatedlearning"]
    fl_data_setting: FlDataSetting = FlDataSetting()
    initial_model_url: str | None = None
    modules: list[Module] = Field(min_length=1)


class AlgorithmFile(FileModel):
    algorithm: Algorithm
