"""The typed recipe: one source of truth for YAML files, `--set` overrides and defaults."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shitate.errors import ConfigError

DEFAULT_MODEL = "gemma-3-270m"
TEMPLATES = ("auto", "gemma", "chatml", "llama3", "plain")


class Spec(BaseModel):
    # A typo such as `lerning_rate` must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSource(Spec):
    path: Path = Field(description="a data file (or, for stage pretrain, a folder of .txt/.md files)")
    weight: float = Field(1.0, gt=0, description="how many times each record is used an epoch: 0.1 takes a seeded "
                                                 "tenth of the file, 2 takes every record twice")


class DataSpec(Spec):
    train: Path | list[DataSource] = Field(
        description="training data: one file, or a list of {path, weight} sources mixed by the seed (for example "
                    "your own pairs plus a share of a general chat set, so the model keeps its everyday manners)")
    validation: Path | None = Field(None, description="held-out data for the validation loss (perplexity for pretrain)")
    test: Path | None = Field(None, description="chat JSONL of held-out questions for `compare`/`eval`")
    system: str | None = Field(None, description="system prompt added to every conversation that has none")

    def is_mixed(self) -> bool:
        return isinstance(self.train, list)

    def train_sources(self) -> list[DataSource]:
        return list(self.train) if isinstance(self.train, list) else [DataSource(path=self.train)]

    def files(self) -> dict[str, list[DataSource]]:
        """Every data source by split, for checks and the manifest."""
        found = {"train": self.train_sources()}
        for split in ("validation", "test"):
            if getattr(self, split) is not None:
                found[split] = [DataSource(path=getattr(self, split))]
        return found


ADAPTER_METHODS = ("lora", "dora", "loraplus", "qlora", "full")


class AdapterSpec(Spec):
    method: Literal["lora", "dora", "loraplus", "qlora", "full"] = Field(
        "lora", description="lora; dora (weight-decomposed LoRA); loraplus (B matrices learn loraplus_ratio times "
                            "faster); qlora (LoRA on a 4-bit NF4 base through bitsandbytes, on a GPU or a CPU); full")
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="modules that get adapters; all-linear excludes the output layer"
    )
    loraplus_ratio: float = Field(16.0, gt=0, description="loraplus: learning rate of B over that of A (the LoRA+ "
                                                          "paper found 16 a good default)")


CPU_MICRO_BATCH_TOKENS = 256


class TrainSpec(Spec):
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per optimizer step (per device)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    micro_batch_tokens: int | Literal["auto"] | None = Field(
        "auto", description="split each step further into micro-batches of at most this many tokens "
                             "(gradients are accumulated: the same step with less memory); auto: "
                             f"{CPU_MICRO_BATCH_TOKENS} on a CPU, where it saved 0.2-0.5 GB of peak memory for up to "
                             "10% of the speed in bench/train_throughput.py, none on a GPU; null: never")
    learning_rate: float = Field(2.0e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, le=0.5)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(512, ge=8, description="tokens; longer examples are cut on the right")
    overlong: Literal["drop", "error"] = Field(
        "drop", description="an example whose whole answer lies past max_length (nothing left to learn): drop it "
                            "with a warning that names its line, or stop with an error")
    activation_checkpointing: bool = Field(
        False, description="keep only each layer's input and recompute the rest in the backward pass: "
                           "far less memory for about a third more time")
    seed: int = 42
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU that has it; on a CPU with bf16 instructions the faster of bf16 and "
                            "fp32 matmul, measured once per machine; fp32 otherwise"
    )
    checkpoint_every: int = Field(0, ge=0, description="optimizer steps between checkpoints; 0 = each epoch")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)

    @field_validator("micro_batch_tokens", mode="before")
    @classmethod
    def _tokens_auto_or_null(cls, value: Any) -> Any:
        # One plain sentence instead of pydantic's report for each member of the union.
        if value is None or value == "auto" or (type(value) is int and value >= 8):
            return value
        raise ValueError("use a number of tokens (at least 8), auto, or null")


class SFTSpec(Spec):
    """Stage sft: chats in, loss on the assistant turns only."""

    packing: bool | Literal["auto"] = Field(
        "auto", description="put examples end to end (no padding), each attending only to itself; "
                            "auto packs a micro-batch when padding it would waste more than a tenth of its tokens")
    pack_length: int = Field(4096, ge=8, description="tokens per packed row; a micro-batch longer than this uses several")


class PretrainSpec(Spec):
    """Stage pretrain: raw text in, loss on every token."""

    block_size: int = Field(512, ge=8, description="tokens per training row: whole documents are packed into rows of "
                                                   "this length, each attending only within itself; a longer document "
                                                   "is cut, each later piece starting again with <bos>")


class PairsSpec(Spec):
    """What the preference stages share: pairs packed into rows, the prompt once per pair."""

    pack_length: int = Field(4096, ge=8, description="tokens per packed row; each pair is its prompt once, then "
                                                     "both answers, each answer seeing only the prompt and itself")


class RewardSpec(PairsSpec):
    """Stage reward: a reward model (a scalar head on the last answer token) from preference pairs."""

    margin: float = Field(0.0, ge=0.0, description="Bradley–Terry loss −log σ(r(chosen) − r(rejected) − margin): "
                                                   "0 is the plain loss; a margin asks for a clearer gap")


class DPOSpec(PairsSpec):
    """Stage dpo: direct preference optimisation against the starting model (the base with the adapter off)."""

    beta: float = Field(0.1, gt=0.0, description="how far the tuned model may move from the reference; smaller "
                                                 "moves further")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid: DPO's −log σ(β·margin); ipo: "
                                                                   "(margin − 1/(2β))² on mean per-token log-probs")


class ORPOSpec(PairsSpec):
    """Stage orpo: tuning and preference in one stage, from the base model, with no reference model."""

    odds_ratio_weight: float = Field(0.1, gt=0.0, description="λ: loss = NLL(chosen) − λ·log σ(log odds ratio)")


class RLSpec(Spec):
    """What stages ppo and grpo share: sample answers to the prompts, reward them, move towards the better ones."""

    reward_model: Path | None = Field(None, description="a finished run folder of stage reward; its tokenizer must be "
                                                         "the policy's")
    reward_model_weight: float = Field(1.0, ge=0.0, description="weight of the reward model's score in the reward")
    rubric_weight: float = Field(1.0, ge=0.0, description="weight of the share of eval.rubric checks an answer "
                                                          "passes (0 to 1) in the reward; 0 = do not use the rubric")
    kl_coef: float = Field(0.05, ge=0.0, description="β: how strongly the policy is held near where it started")
    max_kl: float | None = Field(20.0, gt=0.0, description="stop (keeping the last checkpoint) when the mean KL to "
                                                           "the start, per answer, passes this; null = never")
    samples_per_prompt: int = Field(4, ge=1, description="answers sampled for each prompt in a rollout")
    max_new_tokens: int = Field(48, ge=1, description="longest sampled answer")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of the rollouts")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    update_epochs: int = Field(2, ge=1, description="optimizer passes over each rollout")
    clip_range: float = Field(0.2, gt=0.0, description="PPO's ε: the probability ratio is clipped to [1−ε, 1+ε]")
    validation_every: int = Field(0, ge=0, description="rollouts between greedy answers to the validation prompts "
                                                       "(mean reward logged); 0 = before and after only")


class PPOSpec(RLSpec):
    """Stage ppo (InstructGPT's RLHF): a value head, GAE, clipped policy and value losses, a KL-shaped reward."""

    samples_per_prompt: int = Field(1, ge=1, description="answers sampled for each prompt in a rollout")
    value_coef: float = Field(0.1, ge=0.0, description="weight of the value loss")
    value_clip_range: float = Field(0.2, gt=0.0, description="values move at most this far from the rollout's")
    gamma: float = Field(1.0, gt=0.0, le=1.0, description="discount per token")
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0, description="λ of generalised advantage estimation")


class GRPOSpec(RLSpec):
    """Stage grpo (DeepSeekMath): each answer's advantage is its reward against its prompt's group; no value head."""

    samples_per_prompt: int = Field(4, ge=2, description="answers sampled for each prompt: the group each answer's "
                                                         "reward is compared with")


STAGES = ("sft", "pretrain", "reward", "dpo", "orpo", "ppo", "grpo")
PAIR_STAGES = ("reward", "dpo", "orpo")
RL_STAGES = ("ppo", "grpo")


class GenerateSpec(Spec):
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    batch_size: int = Field(8, ge=1)


class RubricCheck(Spec):
    name: str
    check: Literal["ends_with", "max_sentences", "contains", "not_contains", "max_chars", "regex", "is_json", "japanese"]
    values: list[str] | None = None
    value: int | float | str | None = Field(None, description="the number for max_sentences, max_chars, japanese (share)")

    @model_validator(mode="after")
    def _has_what_it_checks(self) -> RubricCheck:
        if self.check in ("ends_with", "contains", "not_contains", "regex") and not self.values:
            raise ValueError(f"check {self.check} needs `values: [...]` (the strings to look for)")
        if self.check in ("max_sentences", "max_chars") and not isinstance(self.value, int):
            raise ValueError(f"check {self.check} needs `value:` a whole number")
        return self


class EvalSpec(Spec):
    rubric: list[RubricCheck] = Field(default_factory=list)
    every_steps: int = Field(0, ge=0, description="during training, answer a few validation questions every N "
                                                  "steps and log rubric and chrF with the loss; 0 = off")
    examples: int = Field(8, ge=1, description="questions answered at each evaluation during training")


class Recipe(Spec):
    name: str = Field(pattern=r"^[\w.\-]+$", description="run name; the run folder is runs/<name>")
    model: str = Field(DEFAULT_MODEL, description="gemma-3-270m, a local folder, a .gguf file, a run folder, or a hub id")
    template: Literal["auto", "gemma", "chatml", "llama3", "plain"] = "auto"
    stage: Literal["sft", "pretrain", "reward", "dpo", "orpo", "ppo", "grpo"] = Field(
        "sft", description="sft (chats, loss on the answers); pretrain (raw text, loss on every token); reward, dpo, "
                           "orpo (preference pairs); ppo, grpo (prompts, rewarded by a reward model or the rubric)")
    data: DataSpec
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    sft: SFTSpec = Field(default_factory=SFTSpec, description="settings of stage sft")
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec, description="settings of stage pretrain")
    reward: RewardSpec = Field(default_factory=RewardSpec, description="settings of stage reward")
    dpo: DPOSpec = Field(default_factory=DPOSpec, description="settings of stage dpo")
    orpo: ORPOSpec = Field(default_factory=ORPOSpec, description="settings of stage orpo")
    ppo: PPOSpec = Field(default_factory=PPOSpec, description="settings of stage ppo")
    grpo: GRPOSpec = Field(default_factory=GRPOSpec, description="settings of stage grpo")
    generate: GenerateSpec = Field(default_factory=GenerateSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)


def _known_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at `loc`'s parent, for 'did you mean' hints."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            return []
        annotation = current.model_fields[part].annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(current.model_fields) if current else []


# Sections whose settings a misplaced key may belong to: `train.packing` is `sft.packing`.
_SECTIONS: dict[str, type[BaseModel]] = {"train": TrainSpec, "sft": SFTSpec, "pretrain": PretrainSpec,
                                         "reward": RewardSpec, "dpo": DPOSpec, "orpo": ORPOSpec, "ppo": PPOSpec,
                                         "grpo": GRPOSpec, "adapter": AdapterSpec}


def _home_of(key: str, not_in: str) -> str | None:
    homes = [name for name, spec in _SECTIONS.items() if name != not_in and key in spec.model_fields]
    return homes[0] if homes else None


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    field = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        home = _home_of(str(loc[-1]), str(loc[0])) if len(loc) == 2 else None
        if home:
            owner = f"stage {home}" if home in STAGES else f"`{home}:`"
            return f"{field}: unknown setting here; {loc[-1]} belongs to {owner} ({home}.{loc[-1]})"
        close = difflib.get_close_matches(str(loc[-1]), _known_fields(Recipe, loc), n=1)
        hint = f"; did you mean `{close[0]}`?" if close else "; remove it"
        return f"{field}: unknown setting{hint}"
    if error["type"] == "missing":
        return f"{field}: required but missing"
    if error["type"] == "literal_error" and loc == ("stage",):
        return f"stage: {error['input']!r} is not available yet; this version trains stages {', '.join(STAGES)}"
    message = error["msg"].removeprefix("Value error, ")  # our own validators' sentences stand alone
    return f"{field}: {message} (got {error.get('input')!r})"


def _one_error_per_union(errors: list[Any]) -> list[dict[str, Any]]:
    """pydantic reports a union (`data.train`: a path or a list of sources) once per member; keep the one meant."""
    cleaned = [{**e, "loc": tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p))} for e in errors]
    kept = []
    for error in cleaned:
        deeper = any(len(o["loc"]) > len(error["loc"]) and o["loc"][:len(error["loc"])] == error["loc"] for o in cleaned)
        if error["type"] == "path_type" and (deeper or isinstance(error.get("input"), (list, int, float))):
            if deeper:
                continue
            error = {**error, "msg": "give a file path, or a list of {path, weight} sources"}
        if error["type"] == "list_type" and any(o["type"] == "path_type" and o["loc"] == error["loc"] for o in cleaned):
            continue
        kept.append(error)
    return kept


def _stage_section_problems(raw: dict[str, Any]) -> list[str]:
    """A section of settings for a stage other than the recipe's own is a mistake, not something to ignore."""
    stage = raw.get("stage", "sft")
    return [f"{section}: settings for stage {section}, but this recipe's stage is {stage}; "
            f"set `stage: {section}` or remove the `{section}:` section"
            for section in STAGES if section in raw and section != stage and stage in STAGES]


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating levels as needed."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`train.epochs=2` → ("train.epochs", 2); values are read as YAML scalars."""
    parsed = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, for example --set train.epochs=2")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {pair!r}: the value is not a YAML scalar or list ({getattr(err, 'problem', err)}); "
                              "quote it, e.g. --set data.system='…'") from None
        parsed.append((key.strip(), value))
    return parsed


def _resolve_data_paths(raw: dict[str, Any], base: Path) -> None:
    """Relative data paths are read relative to the recipe, so a copied recipe folder keeps working."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return

    def resolved(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            return str((base / value).resolve())
        return value

    for split in ("train", "validation", "test"):
        data[split] = resolved(data.get(split)) if split in data else None
        if data[split] is None:
            data.pop(split)
    if isinstance(data.get("train"), list):
        for source in data["train"]:
            if isinstance(source, dict) and "path" in source:
                source["path"] = resolved(source["path"])


def load_recipe(path: Path, overrides: list[str] | None = None, check_files: bool = True) -> Recipe:
    """Read, override and validate a recipe; raise one ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe not found. Copy one from examples/ (e.g. examples/kids_qa/recipe.yaml).")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text. Save the recipe as UTF-8.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)}). "
                          "Check indentation and colons.") from None
    if raw is None:
        raise ConfigError(f"{path}: the recipe is empty. Copy one from examples/ (e.g. examples/kids_qa/recipe.yaml).")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping (name:, model:, data: …), not {type(raw).__name__}.")
    for key, value in parse_overrides(overrides or []):
        set_dotted(raw, key, value)
    _resolve_data_paths(raw, path.parent)
    return validate_recipe(raw, source=str(path), check_files=check_files)


def validate_recipe(raw: dict[str, Any], source: str = "recipe", check_files: bool = True) -> Recipe:
    """Validate a recipe mapping, collecting schema and file problems together."""
    problems: list[str] = []
    recipe: Recipe | None = None
    raw = {key: value for key, value in raw.items() if not (key in STAGES and value is None)}  # `--set pretrain=null`
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        problems.extend(dict.fromkeys(_describe(e) for e in _one_error_per_union(err.errors())))
    problems.extend(_stage_section_problems(raw))
    if recipe is not None and check_files:
        for split, sources in recipe.data.files().items():
            for data_source in sources:
                folder_allowed = recipe.stage == "pretrain" and split != "test"
                if not (data_source.path.is_file() or folder_allowed and data_source.path.is_dir()):
                    problems.append(f"data.{split}: file {data_source.path} not found (paths are read from the "
                                    "recipe's folder)")
        if recipe.stage in RL_STAGES:
            spec = getattr(recipe, recipe.stage)
            has_rubric = bool(recipe.eval.rubric) and spec.rubric_weight > 0
            if not has_rubric and not (spec.reward_model is not None and spec.reward_model_weight > 0):
                problems.append(f"{recipe.stage}: no reward. Declare checks under eval.rubric (the answers are "
                                f"rewarded by the share they pass), or set {recipe.stage}.reward_model to a run of "
                                "stage reward, or both")
        if recipe.train.batch_size % recipe.train.grad_accum:
            problems.append("train.batch_size must be a multiple of train.grad_accum")
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{source}: {len(problems)} problem(s) in the recipe:\n{listing}")
    assert recipe is not None
    return recipe


def resolved_recipe(recipe: Recipe) -> dict[str, Any]:
    """Every setting with its default filled in, without the sections of stages the recipe does not run."""
    return recipe.model_dump(mode="json", exclude={stage for stage in STAGES if stage != recipe.stage})


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, as saved in a run folder."""
    return yaml.safe_dump(resolved_recipe(recipe), allow_unicode=True, sort_keys=False)
