"""Request and response models of the admin API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from serve.artifacts.jobs import JobRecord
from serve.config import GENERATION_ID_PATTERN


MAX_WAIT_S = 15.0  # + one look at the replicas (8 samples × ≤ 2 s) stays under the proxy's 35 s backstop


class GenerationSummary(BaseModel):
    generation: str
    experts: list[str]
    created_at: str | None = None
    parent: str | None = None
    reason: str = ""
    pilot_rule: str = ""


class GenerationsResponse(BaseModel):
    current: str | None = Field(..., description="the generation CURRENT.json names (what the replicas follow)")
    pin: str = Field(..., description="experts.generation: 'current', or the generation the config pins")
    generations: list[GenerationSummary] = Field(..., description="every published generation, oldest first")
    replicas: dict[str, str | None] = Field(..., description="encoder replicas sampled now → the generation each serves")


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    generation: str = Field(..., pattern=GENERATION_ID_PATTERN, description="gNNNNNN, a published generation")
    wait_s: float = Field(10.0, ge=0, le=MAX_WAIT_S, description="wait up to this long for the sampled replicas to serve it")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wait_s: float = Field(10.0, ge=0, le=MAX_WAIT_S, description="wait up to this long for the sampled replicas to serve it")


class ActivateResponse(BaseModel):
    generation: str
    previous: str | None
    experts: list[str]
    switched: bool = Field(..., description="every sampled encoder replica serves the generation")
    replicas: dict[str, str | None]
    waited_s: float


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="the new expert's name (letters, digits, . _ -)")
    adapter: str = Field(..., description="the peft LoRA adapter folder, relative to experts.register_root (or an "
                         "absolute path under it; symlinks resolved, nothing outside it)")
    domain: str | None = Field(None, description="the dataset whose training queries give its pilots (default: name)")
    replace: bool = Field(False, description="replace an expert of the same name")


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    domain: str = Field(..., description="a dataset under the service's data dir: its training queries train the expert")
    steps: int | None = Field(None, ge=1, le=100_000, description="training steps (default: experts.training.steps)")


class JobResponse(BaseModel):
    job: JobRecord
    log_tail: list[str] = Field([], description="the last lines of the job's output")


class JobsResponse(BaseModel):
    jobs: list[JobRecord] = Field(..., description="the newest jobs, newest first")
