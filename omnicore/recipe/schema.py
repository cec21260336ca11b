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

    type: str  # a registered component name (`omni plugins`)
    # keyword arguments of the component's factory, checked against its signature
    params: dict[str, Any] = Field(default_factory=dict)
    weights: Optional[str] = None  # a local file loaded after building (safetensors, or .pt read weights_only)
    weights_prefix: Optional[str] = None  # keep only the file's keys under this prefix, stripped ("backbone.")
    weights_map: dict[str, str] = Field(default_factory=dict)  # file key -> module key; only these are loaded

    @model_validator(mode="before")
    @classmethod
    def _drop_saved_trainable(cls, data: Any) -> Any:
        # config.json of models saved while the schema had a (never read) 'trainable' option holds
        # "trainable": null in every component; a set value stays an unknown key
        if isinstance(data, dict) and "trainable" in data and data["trainable"] is None:
            data = {k: v for k, v in data.items() if k != "trainable"}
        return data


class ModelSpec(Strict):
    """Components by role. Fixed roles are typed; further roles go under ``extra``."""

    encoder: Optional[ComponentSpec] = None  # the MMU image encoder (e.g. timm_vit, dino_siglip)
    projector: Optional[ComponentSpec] = None  # encoder features -> d_model (in_dim and out_dim are wired in)
    image_tokenizer: Optional[ComponentSpec] = None  # the VQ tokenizer whose codes T2I predicts
    text_tokenizer: Optional[ComponentSpec] = None  # required: byte, or hf_tokenizer over a local tokenizer.json
    backbone: ComponentSpec  # the sequence model (mamba2), with its task LoRA adapters
    # text (required), image, caption, caption_pool, position tables, contrastive
    heads: dict[str, ComponentSpec] = Field(default_factory=dict)
    extra: dict[str, ComponentSpec] = Field(default_factory=dict)  # further roles a plugin's model parts need
    # T2I caption tokens, left padded to this length (longer captions are cut, with a warning)
    max_caption_tokens: int = Field(68, gt=0)
    max_text_tokens: int = Field(512, gt=0)  # MMU text budget after the image (question + answer tokens)
    image_size: int = Field(256, gt=0)  # T2I resolution: the tokenizer's grid is image_size / downsample
    caption_reads: int = Field(1, ge=1, le=4)  # the T2I caption block repeated ("just read twice", layout.py)
    # how a question becomes MMU prompt text: omnicore (the question and a newline; answers end at <|eot|> or
    # eos), omnimamba-chat ("USER: {question} ASSISTANT:", the released inference), omnimamba-train
    # ("In: {question}\nOut: "), a plugin's name, or any text with {question} (answers end at eos)
    mmu_template: str = "omnicore"

    @field_validator("mmu_template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        from ..errors import OmnicoreError
        from ..model.layout import mmu_template

        try:
            mmu_template(value)
        except OmnicoreError as exc:  # pydantic reports ValueErrors as field errors
            raise ValueError(str(exc)) from None
        return value


class DataSpec(ComponentSpec):
    """A registered dataset plus loader settings."""

    num_workers: int = Field(0, ge=0)  # DataLoader worker processes (0: in the training process)
    shuffle: bool = True  # a seeded permutation each epoch (resumable), else file order


class TaskSpec(Strict):
    batch_size: int = Field(gt=0)  # rows a step, summed over processes (must divide by their number)
    weight: float = Field(1.0, ge=0)  # the task loss's weight in the stage's summed loss
    # t2i only: weigh each target code by (its count in the batch) ** -code_balance, so rare codes (the object)
    # count more against frequent ones (the background); 0 = plain mean (omnicore.model.losses.code_balanced_ce)
    code_balance: float = Field(0.0, ge=0, le=1)
    data: Optional[DataSpec] = None  # the task's dataset

    def loss_options(self) -> dict:
        """Keyword arguments of the task's loss (UnifiedModel.loss) that differ from its defaults."""
        return {"code_balance": self.code_balance} if self.code_balance else {}


class TrainSpec(Strict):
    """What a stage unfreezes: whole roles, parameter-name globs and LoRA adapters (by task)."""

    # roles to train: encoder, projector, backbone, image_tokenizer, heads, heads.<name>
    roles: list[str] = Field(default_factory=list)
    globs: list[str] = Field(default_factory=list)  # parameter-name patterns to train (fnmatch)
    adapters: list[str] = Field(default_factory=list)  # LoRA adapters to train, by task (mmu, t2i)


class OptimizerSpec(Strict):
    name: Literal["adamw"] = "adamw"  # AdamW (torch.optim.AdamW)
    lr: float = Field(gt=0)  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's moment decays
    weight_decay: float = Field(0.0, ge=0)  # decoupled weight decay
    eps: float = Field(1e-8, gt=0)  # AdamW's denominator term


class ScheduleSpec(Strict):
    # cosine: linear warm-up, then cosine decay to min_lr_ratio * lr; constant: warm-up only; wsd: warm-up, stable
    # at lr, then a cosine decay to min_lr_ratio * lr over the last decay_steps
    kind: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int = Field(0, ge=0)  # steps of linear warm-up from 0
    min_lr_ratio: float = Field(0.01, ge=0, le=1)  # the cosine's end as a fraction of lr
    decay_steps: Optional[int] = Field(None, ge=0)  # wsd only: the final steps that decay (required with wsd)

    @model_validator(mode="after")
    def _wsd_decay(self) -> "ScheduleSpec":
        if self.kind == "wsd" and self.decay_steps is None:
            raise ValueError("schedule kind wsd needs decay_steps (the final steps that decay)")
        if self.kind != "wsd" and self.decay_steps is not None:
            raise ValueError(f"decay_steps is for schedule kind wsd, not {self.kind}")
        return self


# the mixer parameters a distillation stage can train (mmMamba's names)
MIXER_PARAMS = ("q_proj", "k_proj", "v_proj", "o_proj", "conv1d", "in_proj", "g_proj", "g_norm", "dt_bias",
                "A_log_bias")
MixerParam = Literal["q_proj", "k_proj", "v_proj", "o_proj", "conv1d", "in_proj", "g_proj", "g_norm", "dt_bias",
                     "A_log_bias"]
# mmMamba's stage 1 (the parameters seeding creates) and stage 3 (the projections, not dt_bias, A_log_bias, o_proj)
LAYERWISE_PARAMS = ("conv1d", "in_proj", "g_proj", "g_norm", "dt_bias", "A_log_bias")
E2E_PARAMS = ("q_proj", "k_proj", "v_proj", "conv1d", "in_proj", "g_proj", "g_norm")


class StudentSpec(Strict):
    """A new student: the teacher's backbone with every attention layer outside ``hybrid`` seeded into a mixer."""

    mixer: str = "mmmamba"  # a registered mixer kind that can be seeded (`omni plugins`)
    hybrid: list[int] = Field(default_factory=list)  # layer indices that keep the teacher's attention, frozen
    # the mixer's seed options (mmmamba: conv_width, chunk_size, dt_min, dt_max, dt_init_floor, A_log_init,
    # gate_gain, kernel)
    mixer_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("hybrid")
    @classmethod
    def _indices(cls, hybrid: list[int]) -> list[int]:
        if any(i < 0 for i in hybrid) or len(set(hybrid)) != len(hybrid):
            raise ValueError(f"hybrid: layer indices must be distinct and >= 0 (got {hybrid})")
        return hybrid

    @model_validator(mode="after")
    def _seedable(self) -> "StudentSpec":
        from ..distill.seeding import check_seed_options
        from ..errors import OmnicoreError

        if "generator" in self.mixer_options or "layer_idx" in self.mixer_options:
            raise ValueError("mixer_options: generator and layer_idx are set by the student, not the recipe")
        try:
            check_seed_options(self.mixer, self.mixer_options)
        except OmnicoreError as exc:  # pydantic reports ValueErrors as field errors
            raise ValueError(str(exc)) from None
        return self


class DistillSpec(Strict):
    """What a distill_layerwise / distill_e2e stage distils from and into."""

    # the teacher: a model directory (backbone type transformer); None: for a new student made from the run's model,
    # that model (saved as the run directory's teacher/), else the teacher the latest student was made from
    teacher: Optional[str] = None
    # start a new student from the teacher here (seeded); None: continue the student the previous stage left
    student: Optional[StudentSpec] = None
    # mixer parameters to train in every mixer layer; None: layerwise trains the new ones (conv1d, in_proj, g_proj,
    # g_norm, dt_bias, A_log_bias: mmMamba's stage 1; add q_proj, k_proj, v_proj for its stage 2), e2e the
    # projections (q_proj, k_proj, v_proj, conv1d, in_proj, g_proj, g_norm: its stage 3)
    train_params: Optional[list[MixerParam]] = None
    loss_scale: float = Field(1000.0, gt=0)  # distill_layerwise: the per-layer MSE's multiplier
    temperature: float = Field(1.0, gt=0)  # distill_e2e: softmax temperature of both distributions

    def trained(self, kind: str) -> tuple[str, ...]:
        if self.train_params is not None:
            return tuple(dict.fromkeys(self.train_params))
        return LAYERWISE_PARAMS if kind == "distill_layerwise" else E2E_PARAMS


class StageSpec(Strict):
    name: str  # unique; names checkpoints and overrides (stages.<name>.steps=10)
    # unified: the model's tasks; vqgan: the image tokenizer; contrastive: the encoder, SigLIP-style, against the
    # caption tower heads.contrastive; distill_layerwise: a student's mixers against the teacher's attention, layer by
    # layer on the teacher's hidden states; distill_e2e: the student's answer distributions against the teacher's
    kind: Literal["unified", "vqgan", "contrastive", "distill_layerwise", "distill_e2e"] = "unified"
    # unified stages: mmu and/or t2i, one forward each with its own adapter
    tasks: dict[str, TaskSpec] = Field(default_factory=dict)
    # for kinds vqgan (images), contrastive (images with captions) and distill_* (MMU samples)
    data: Optional[DataSpec] = None
    batch_size: Optional[int] = Field(None, gt=0)  # for kinds vqgan, contrastive and distill_*
    distill: Optional[DistillSpec] = None  # for kinds distill_*: teacher, student, what trains, loss options
    train: TrainSpec = Field(default_factory=TrainSpec)  # what the stage unfreezes; everything else is frozen
    optimizer: OptimizerSpec  # AdamW settings
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)  # learning-rate schedule over the stage's steps
    steps: int = Field(gt=0)  # optimizer steps
    grad_accum: int = Field(1, gt=0)  # micro-batches a step (gradients synchronised on the last only)
    grad_clip: Optional[float] = Field(1.0, gt=0)  # clip the gradient norm to this (null: no clipping)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False  # recompute backbone blocks in backward (less memory, more time)
    # unified stages on one CUDA device: capture each step (forward, backward, clipping, AdamW) as a CUDA graph and
    # replay it (omnicore.training.graphed_step); one graph per batch shape, so batches of a few fixed shapes
    cuda_graph: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"  # used when launched with several processes
    # probability of training T2I on the unconditional prompt (for guidance)
    caption_dropout: float = Field(0.0, ge=0, le=1)
    # decay of an exponential moving average of the trained weights (e.g. 0.99: about the last 100 steps), which
    # replaces them at the stage's end, so later stages, the saved model and the evaluation use the average;
    # None: the last step's weights (omnicore.training.ema)
    ema: Optional[float] = Field(None, gt=0, lt=1)
    # T2I images encoded once at the stage start instead of at every draw; None: when the image tokenizer is
    # frozen and the stage draws at least as many samples as the dataset holds
    cache_codes: Optional[bool] = None
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end of the stage
    log_every: int = Field(10, gt=0)  # steps between metrics.jsonl records
    init_from: Optional[str] = None  # a checkpoint or model directory to start from
    seed: Optional[int] = None  # reseed before this stage (null: continue the run's random streams)
    # also write the model as this stage leaves it as a model directory of this name in the run directory
    save_model: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

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
        if self.schedule.kind == "wsd" and self.schedule.warmup_steps + self.schedule.decay_steps > self.steps:
            raise ValueError(f"schedule: warmup_steps {self.schedule.warmup_steps} + decay_steps "
                             f"{self.schedule.decay_steps} exceed the stage's {self.steps} steps")
        if self.cuda_graph and self.kind != "unified":
            raise ValueError(f"cuda_graph is for unified stages, not {self.kind}")
        if self.kind.startswith("distill_"):
            self._check_distill()
        elif self.distill is not None:
            raise ValueError(f"'distill' is for kinds distill_layerwise and distill_e2e, not {self.kind}")
        return self

    def _check_distill(self) -> None:
        """Options a distillation stage would not read are refused, not ignored."""
        if self.distill is None:
            self.distill = DistillSpec()
        given = self.model_fields_set
        unread = [name for name in ("tasks", "train", "caption_dropout", "cache_codes")
                  + (("gradient_checkpointing",) if self.kind == "distill_layerwise" else ()) if name in given]
        if unread:
            raise ValueError(f"a {self.kind} stage does not take {unread[0]!r} (what it trains is "
                             "distill.train_params; its data is 'data')")
        wrong = "temperature" if self.kind == "distill_layerwise" else "loss_scale"
        if wrong in self.distill.model_fields_set:
            raise ValueError(f"distill.{wrong} is for "
                             f"{'distill_e2e' if wrong == 'temperature' else 'distill_layerwise'} stages")


class SamplingSpec(Strict):
    temperature: float = Field(1.0, ge=0)  # 0: greedy
    top_k: Optional[int] = Field(None, gt=0)  # keep the k most likely tokens
    top_p: Optional[float] = Field(None, gt=0, le=1)  # keep the smallest set of tokens with this much probability
    min_p: Optional[float] = Field(None, ge=0, le=1)  # drop tokens below min_p times the top token's probability
    repetition_penalty: float = Field(1.0, gt=0)  # divide logits of tokens already produced by this (1: off)
    max_new_tokens: int = Field(64, gt=0)  # MMU answer length limit (T2I always draws the whole code grid)
    guidance_scale: float = Field(1.0, ge=0)  # T2I classifier-free guidance (1: off)
    seed: Optional[int] = None  # seeds the sampling noise (null: not reproducible)
    greedy: bool = False  # argmax decoding, whatever the other options


class QuestionSpec(Strict):
    question: str  # the question text
    image: Optional[str] = None  # an image file (relative: to the working directory, else the recipe's folder)


class InferenceInputs(Strict):
    """t2i: ``prompts`` and/or ``prompts_file`` (one prompt a line); mmu: ``questions`` and/or ``jsonl`` (lines of
    ``{"image": path, "question": text}``, images relative to the JSONL's folder). Relative files: to the working
    directory, else the recipe's folder."""

    prompts: list[str] = Field(default_factory=list)  # t2i captions
    prompts_file: Optional[str] = None  # t2i: a text file, one caption a line
    questions: list[QuestionSpec] = Field(default_factory=list)  # mmu questions, each with an optional image
    jsonl: Optional[str] = None  # mmu: lines of {"image": path, "question": text}


class InferenceOutputs(Strict):
    dir: str = "outputs"  # relative to the run directory


class InferenceSpec(Strict):
    """t2i: each prompt ``n_per_prompt`` times -> PNGs, grid.png and index.jsonl; mmu: each question
    ``n_per_prompt`` times -> answers.jsonl; both in ``outputs.dir`` of the run directory. ``batch_size`` rows are
    decoded at once."""

    task: Literal["t2i", "mmu"]  # t2i: images from prompts; mmu: answers to questions
    model: Optional[str] = None  # a model directory; default: the model this recipe's stages produce
    inputs: InferenceInputs = Field(default_factory=InferenceInputs)  # the prompts or questions
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)  # decoding options
    batch_size: int = Field(8, gt=0)  # rows decoded at once
    n_per_prompt: int = Field(1, gt=0)  # samples for each prompt or question
    outputs: InferenceOutputs = Field(default_factory=InferenceOutputs)  # where the results go


class EvaluationSpec(Strict):
    """End-of-run evaluation on held-out data: MMU answers decoded greedily; T2I sampled with ``sampling``."""

    mmu: Optional[DataSpec] = None  # a held-out MMU dataset, scored by exact-match answers
    t2i: Optional[DataSpec] = None  # a held-out T2I dataset that can score images (score_images)
    # decoding options (greedy by default)
    sampling: SamplingSpec = Field(default_factory=lambda: SamplingSpec(greedy=True))
    guidance_scale: float = Field(1.0, ge=0)  # T2I classifier-free guidance (1: off)
    # composable guidance for T2I: each sample's component prompts (the t2i dataset supplies them) push with this
    # scale on top of guidance_scale; the plain-guidance figures are reported too (t2i_plain_*). None: off
    component_scale: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    # T2I guidance away from each sample's negative prompt (the t2i dataset supplies it as 'negative'; the
    # synthetic shapes give the caption without its colour) instead of the unconditional prompt; the
    # plain-guidance figures are reported too (t2i_plain_*)
    negative_prompts: bool = False
    # further model directories evaluated the same way, by name (relative: to the run directory), e.g. a distilled
    # student's teacher: eval.json holds their results under their names
    models: dict[str, str] = Field(default_factory=dict)

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
    description: str = ""  # what the recipe is for (shown by `omni recipe ls`)
    seed: int = 0  # seeds Python, NumPy and torch before the model is built
    model: Optional[ModelSpec] = None  # the model's components by role; needed by training stages
    # training stages, run in order, each from the previous one's weights
    stages: list[StageSpec] = Field(default_factory=list)
    evaluation: Optional[EvaluationSpec] = None  # held-out evaluation after the stages (eval.json)
    inference: Optional[InferenceSpec] = None  # inference after the stages, or on inference.model alone

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
