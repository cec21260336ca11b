"""The recipe schema: one pydantic model covering the model block, training stages and inference.

Unknown keys are errors everywhere (``extra="forbid"``). Component names and their params are checked
against the registry separately (``omnicore.recipe.validate``), since plugins define them.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ComponentSpec(Strict):
    """A registered component by name, with the parameters for its factory."""

    type: str
    params: dict[str, Any] = Field(default_factory=dict)
    weights: Optional[str] = None  # a local file loaded after building (safetensors, or .pt read weights_only)
    weights_prefix: Optional[str] = None  # keep only the file's keys under this prefix, stripped ("backbone.")
    weights_map: dict[str, str] = Field(default_factory=dict)  # file key -> module key; only these are loaded
    trainable: Optional[bool] = None  # a default for stages that do not list this role


class ModelSpec(Strict):
    """Components by role. Fixed roles are typed; further roles go under ``extra``."""

    encoder: Optional[ComponentSpec] = None
    projector: Optional[ComponentSpec] = None
    image_tokenizer: Optional[ComponentSpec] = None
    text_tokenizer: Optional[ComponentSpec] = None
    backbone: ComponentSpec
    heads: dict[str, ComponentSpec] = Field(default_factory=dict)
    extra: dict[str, ComponentSpec] = Field(default_factory=dict)
    # sequence layout (FACTS.md): caption tokens for T2I (left padded) and MMU text budget
    max_caption_tokens: int = Field(68, gt=0)
    max_text_tokens: int = Field(512, gt=0)
    image_size: int = Field(256, gt=0)  # T2I resolution: the tokenizer's grid is image_size / downsample
    caption_reads: int = Field(1, ge=1, le=4)  # the T2I caption block repeated ("just read twice", layout.py)


class DataSpec(ComponentSpec):
    """A registered dataset plus loader settings."""

    num_workers: int = Field(0, ge=0)
    shuffle: bool = True


class TaskSpec(Strict):
    batch_size: int = Field(gt=0)
    weight: float = Field(1.0, ge=0)
    # t2i only: weigh each target code by (its count in the batch) ** -code_balance, so rare codes (the object)
    # count more against frequent ones (the background); 0 = plain mean (omnicore.model.losses.code_balanced_ce)
    code_balance: float = Field(0.0, ge=0, le=1)
    data: Optional[DataSpec] = None

    def loss_options(self) -> dict:
        """Keyword arguments of the task's loss (UnifiedModel.loss) that differ from its defaults."""
        return {"code_balance": self.code_balance} if self.code_balance else {}


class TrainSpec(Strict):
    """What a stage unfreezes: whole roles, parameter-name globs and LoRA adapters (by task)."""

    roles: list[str] = Field(default_factory=list)
    globs: list[str] = Field(default_factory=list)
    adapters: list[str] = Field(default_factory=list)


class OptimizerSpec(Strict):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)


class ScheduleSpec(Strict):
    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)


class StageSpec(Strict):
    name: str
    # unified: the model's tasks; vqgan: the image tokenizer; contrastive: the encoder, SigLIP-style, against the
    # caption tower heads.contrastive
    kind: Literal["unified", "vqgan", "contrastive"] = "unified"
    tasks: dict[str, TaskSpec] = Field(default_factory=dict)
    data: Optional[DataSpec] = None  # for kinds vqgan (images) and contrastive (images with captions)
    batch_size: Optional[int] = Field(None, gt=0)  # for kinds vqgan and contrastive
    train: TrainSpec = Field(default_factory=TrainSpec)
    optimizer: OptimizerSpec
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    steps: int = Field(gt=0)
    grad_accum: int = Field(1, gt=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"  # used when launched with several processes
    caption_dropout: float = Field(0.0, ge=0, le=1)
    # decay of an exponential moving average of the trained weights (e.g. 0.99: about the last 100 steps), which
    # replaces them at the stage's end, so later stages, the saved model and the evaluation use the average;
    # None: the last step's weights (omnicore.training.ema)
    ema: Optional[float] = Field(None, gt=0, lt=1)
    # T2I images encoded once at the stage start instead of at every draw; None: when the image tokenizer is
    # frozen and the stage draws at least as many samples as the dataset holds
    cache_codes: Optional[bool] = None
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end of the stage
    eval_every: int = Field(0, ge=0)
    log_every: int = Field(10, gt=0)
    init_from: Optional[str] = None  # a checkpoint or model directory to start from
    seed: Optional[int] = None

    @model_validator(mode="after")
    def _check_kind(self) -> "StageSpec":
        if self.kind == "unified":
            if not self.tasks:
                raise ValueError("a unified stage needs at least one task under 'tasks'")
            for task, spec in self.tasks.items():
                if spec.data is None:
                    raise ValueError(f"task {task!r} has no 'data'")
        else:
            if self.data is None or self.batch_size is None:
                raise ValueError(f"a {self.kind} stage needs 'data' and 'batch_size'")
        return self


class SamplingSpec(Strict):
    temperature: float = Field(1.0, ge=0)
    top_k: Optional[int] = Field(None, gt=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    guidance_scale: float = Field(1.0, ge=0)
    seed: Optional[int] = None
    greedy: bool = False
    ignore_eos: bool = False


class InferenceSpec(Strict):
    task: Literal["t2i", "mmu"]
    model: Optional[str] = None  # a model directory; default: the model this recipe's stages produce
    inputs: dict[str, Any] = Field(default_factory=dict)  # prompts / prompts_file / jsonl
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    batch_size: int = Field(8, gt=0)
    n_per_prompt: int = Field(1, gt=0)
    outputs: dict[str, Any] = Field(default_factory=dict)


class EvaluationSpec(Strict):
    """End-of-run evaluation on held-out data: MMU answers decoded greedily; T2I sampled with ``sampling``."""

    mmu: Optional[DataSpec] = None
    t2i: Optional[DataSpec] = None
    sampling: SamplingSpec = Field(default_factory=lambda: SamplingSpec(greedy=True))
    guidance_scale: float = Field(1.0, ge=0)
    # composable guidance for T2I: each sample's component prompts (the t2i dataset supplies them) push with this
    # scale on top of guidance_scale; the plain-guidance figures are reported too (t2i_plain_*). None: off
    component_scale: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    # T2I guidance away from each sample's negative prompt (the t2i dataset supplies it as 'negative'; the
    # synthetic shapes give the caption without its colour) instead of the unconditional prompt; the
    # plain-guidance figures are reported too (t2i_plain_*)
    negative_prompts: bool = False

    @model_validator(mode="after")
    def _components_need_t2i(self) -> "EvaluationSpec":
        for name, on in (("component_scale", self.component_scale is not None),
                         ("negative_prompts", self.negative_prompts)):
            if on and self.t2i is None:
                raise ValueError(f"{name} applies to T2I: give a 't2i' dataset or leave {name} out")
        if self.negative_prompts and self.guidance_scale == 1.0:
            raise ValueError("negative_prompts has no effect at guidance_scale 1: give a guidance_scale (e.g. 4)")
        return self


class Recipe(Strict):
    description: str = ""
    seed: int = 0
    model: Optional[ModelSpec] = None
    stages: list[StageSpec] = Field(default_factory=list)
    evaluation: Optional[EvaluationSpec] = None
    inference: Optional[InferenceSpec] = None

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, stages: list[StageSpec]) -> list[StageSpec]:
        names = [s.name for s in stages]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(sorted(dup))}")
        return stages

    @model_validator(mode="after")
    def _needs_something(self) -> "Recipe":
        if not self.stages and self.inference is None and self.evaluation is None:
            raise ValueError("a recipe needs 'stages', 'evaluation' or 'inference'")
        if self.stages and self.model is None:
            raise ValueError("training stages need a 'model' block")
        return self
