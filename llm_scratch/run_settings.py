"""What the settings of every fine-tuning command share (`finetune`, `instruct`): the fields, their checks,
the defaults decided once (`resolved()`, what run.json records), the base model a run starts from, and the
trained tensors it saves and loads.

Each command subclasses `RunSettings`, naming its defaults in class attributes and adding its own fields.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from llm_scratch.adapters import load_lora, save_lora
from llm_scratch.config import PRESETS, QUICK_PRESET, pick_device, quick_mode
from llm_scratch.files import require_finite, save_safetensors
from llm_scratch.lora import LoRAConfig, replace_linear_with_lora
from llm_scratch.methods import LORA_METHODS, method_lora_config, prepare_for_method
from llm_scratch.model import GPTModel
from llm_scratch.optimizer import LR_SCHEDULES
from llm_scratch.precision import check_precision
from llm_scratch.pretrained import download_gpt2, save_gpt2_safetensors
from llm_scratch.run_folder import fingerprint
from llm_scratch.run_record import (
    ADAPTER_FILE,
    QUICK_BASE_FILE,
    TRAINED_FILE,
    BaseModel,
    RunRecord,
    checked_file,
    load_trained_weights,
)
from llm_scratch.training import NON_FINITE_CAUSES

MAX_SEED = 2**64 - 1  # the largest seed torch.manual_seed takes
DEVICE_NAME = re.compile(r"cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class RunSettings:
    """Everything a fine-tuning run depends on; the CLI's options map one to one onto these fields. None
    means "the default for this run" (quick mode, the method): `resolved()` fills every one in."""

    # What each command defines: its name, its methods and the defaults that depend on quick mode.
    COMMAND: ClassVar[str] = ""
    METHODS: ClassVar[tuple[str, ...]] = ()
    DEFAULT_MODEL_NAME: ClassVar[str] = "gpt2-small"
    EPOCHS: ClassVar[int] = 1
    QUICK_EPOCHS: ClassVar[int] = 1
    BATCH_SIZE: ClassVar[int] = 8
    QUICK_BATCH_SIZE: ClassVar[int] = 8
    LEARNING_RATES: ClassVar[dict[str, float]] = {}  # by method
    QUICK_LEARNING_RATES: ClassVar[dict[str, float]] = {}
    LR_SCHEDULE: ClassVar[str] = "constant"  # one of optimizer.LR_SCHEDULES
    QUICK_LR_SCHEDULE: ClassVar[str] = "constant"
    DEFAULT_LORA: ClassVar[LoRAConfig] = LoRAConfig()
    OUT_PREFIX: ClassVar[str] = ""  # the default run folder is runs/{OUT_PREFIX}{method}

    method: str = "lora"
    model_name: str | None = None  # the GPT-2 size; None: DEFAULT_MODEL_NAME, or "tiny" in quick mode
    epochs: int | None = None  # None: EPOCHS, or QUICK_EPOCHS in quick mode
    out: Path | None = None  # the run folder; None: runs/{OUT_PREFIX}METHOD
    overwrite: bool = False  # replace an existing run in `out` (once the new run is complete)
    lora_config: LoRAConfig | None = None  # rank, alpha, ... (LoRA methods only); None: DEFAULT_LORA
    lr: float | None = None  # None: the method's LEARNING_RATES (or QUICK_LEARNING_RATES)
    lr_schedule: str | None = None  # "constant" or "cosine" (to lr / 10); None: LR_SCHEDULE (or QUICK_...)
    loraplus_lr_ratio: float | None = None  # LoRA+: B learns at lr x this (LoRA methods); None: plain LoRA
    batch_size: int | None = None  # None: BATCH_SIZE, or QUICK_BATCH_SIZE in quick mode
    seed: int = 123
    device: str | None = None  # None: CUDA, then MPS, then CPU
    precision: str = "fp32"  # "bf16" or "fp16": forward passes in 16 bits (llm_scratch.precision)
    quick: bool | None = None  # tiny model, shipped data, no network; None: follow LLM_SCRATCH_QUICK
    data_path: Path | None = None  # a local copy of the data instead of the download or the shipped data
    weights_path: Path | None = None  # a local GPT-2 model.safetensors instead of the download
    random_init: bool = False  # start from random weights instead of pretrained GPT-2
    eval_every: int = 50  # steps between validation-loss checks
    checkpointing: bool | None = None  # recompute each block in backward (less memory); None: for qlora only
    progress: bool = True  # progress bars

    @classmethod
    def from_options(cls, rank: int | None = None, alpha: float | None = None, **fields) -> RunSettings:
        """Settings from flat options, as the command line gives them: `rank` and `alpha` go into the
        LoRAConfig (only when given); an option left out keeps its default."""
        lora = {name: value for name, value in (("rank", rank), ("alpha", alpha)) if value is not None}
        return cls(**fields, lora_config=dataclasses.replace(cls.DEFAULT_LORA, **lora) if lora else None)

    def __post_init__(self) -> None:
        """Refuse, with the option's name, every value a run could not honour."""
        if self.method not in self.METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(self.METHODS)}")
        if self.model_name is not None and self.model_name not in PRESETS:
            raise ValueError(f"unknown --model-name {self.model_name!r}; choose one of {', '.join(PRESETS)}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("eval_every", 1), ("seed", 0)):
            value = getattr(self, name)
            if not (value is None and name in ("epochs", "batch_size")) and not _whole(value, low, MAX_SEED):
                limit = f"from 0 to {MAX_SEED:,} (PyTorch's limit)" if name == "seed" else ">= 1"
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number {limit}, got {value!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f"--lr must be a number > 0 (0 would train nothing), got {self.lr!r}; "
                             "leave it out for the method's default")
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                             f"{self.lr_schedule!r}")
        if self.device is not None and not (isinstance(self.device, str)
                                            and DEVICE_NAME.fullmatch(self.device)):
            raise ValueError(f"--device must be cpu, cuda, cuda:N (the N-th GPU) or mps, got {self.device!r}")
        check_precision(self.precision)
        quick_mode(self.quick)  # refuses anything but True, False and None
        if self.checkpointing not in (None, True, False):
            raise ValueError(f"checkpointing must be True, False or None, got {self.checkpointing!r}")
        self.check_contradictions()

    def check_contradictions(self) -> None:
        """Refuse options that cannot hold together: an option the method does not use is not ignored."""
        if self.weights_path is not None and self.random_init:
            raise ValueError("--weights-path and --random-init contradict each other: pretrained weights "
                             "from a file, or random ones? Drop one of them")
        names = [method for method in self.METHODS if method in LORA_METHODS]
        lora_methods = " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"
        if self.method not in LORA_METHODS and self.lora_config is not None:
            raise ValueError(f"--rank and --alpha (the LoRA config) set LoRA's layers, which method "
                             f"{self.method!r} has none of; use them with method {lora_methods}")
        if self.loraplus_lr_ratio is not None and self.method not in LORA_METHODS:
            raise ValueError(f"LoRA+ (loraplus_lr_ratio={self.loraplus_lr_ratio}) sets the learning rate of "
                             f"LoRA's B matrices; use it with method {lora_methods}, not {self.method!r}")

    def resolved(self) -> RunSettings:
        """These settings with every default decided: quick mode, the model, epochs, learning rate and its
        schedule, device, run folder and the method's LoRA config (None for methods without LoRA). What
        run.json records."""
        quick = quick_mode(self.quick)
        if quick and self.weights_path is not None:
            raise ValueError("--weights-path cannot be used in quick mode (--quick or LLM_SCRATCH_QUICK=1), "
                             "which always starts from a tiny random model; drop one of them")
        if quick and self.model_name not in (None, QUICK_PRESET):
            raise ValueError(f"quick mode always trains the {QUICK_PRESET!r} model, not --model-name "
                             f"{self.model_name}; drop one of them")
        lora = None
        if self.method in LORA_METHODS:
            lora = method_lora_config(self.method, self.lora_config or self.DEFAULT_LORA)
        return dataclasses.replace(
            self, quick=quick,
            model_name=QUICK_PRESET if quick else self.model_name or self.DEFAULT_MODEL_NAME,
            epochs=self.epochs or (self.QUICK_EPOCHS if quick else self.EPOCHS), lora_config=lora,
            batch_size=self.batch_size or (self.QUICK_BATCH_SIZE if quick else self.BATCH_SIZE),
            lr=self.lr or (self.QUICK_LEARNING_RATES if quick else self.LEARNING_RATES)[self.method],
            lr_schedule=self.lr_schedule or (self.QUICK_LR_SCHEDULE if quick else self.LR_SCHEDULE),
            device=str(device_of(self.device)),
            out=Path(self.out or Path("runs") / f"{self.OUT_PREFIX}{self.method}"),
            # QLoRA saves memory, so it saves the activations' too, as the QLoRA paper and PEFT do
            checkpointing=self.method == "qlora" if self.checkpointing is None else self.checkpointing)

    def recorded(self) -> dict:
        """The settings run.json records (of resolved settings): what the run is, not where it went."""
        skipped = {"method", "model_name", "quick", "lora_config", "out", "overwrite", "progress"}
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {name: str(value) if isinstance(value, Path) else value
                for name, value in values.items() if name not in skipped}


def _whole(value, low: int, high: int) -> bool:
    """An int (not a bool) from `low` to `high`."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def device_of(name: str | None) -> torch.device:
    """The device to train on; a clear error for one this machine lacks (e.g. cuda:3 on a one-GPU machine)."""
    device = pick_device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"--device {name} asks for GPU number {device.index}, but this machine has "
                           f"{torch.cuda.device_count()} (numbered from 0)")
    return device


def write_quick_base_model(path: Path, seed: int) -> Path:
    """Quick mode's "pretrained" model: the tiny preset with random weights, in GPT-2's file layout, so it
    is read back through the same loader as the real weights."""
    torch.manual_seed(seed)
    return save_gpt2_safetensors(GPTModel(PRESETS[QUICK_PRESET]), path)


def base_model(settings: RunSettings, folder: Path) -> BaseModel:
    """Where the (resolved) run's base weights come from, with their SHA-256 and size, so that loading the
    run rebuilds the very same model. Quick mode writes its base model into the run's `folder`."""
    name = settings.model_name
    if settings.quick:
        path = write_quick_base_model(folder / QUICK_BASE_FILE, settings.seed)
        return BaseModel("file", name, "quick mode: tiny random model", path=path.name, **fingerprint(path))
    if settings.random_init:
        return BaseModel("random", name, "random init, no pretrained weights", seed=settings.seed)
    if settings.weights_path is not None:
        path = Path(settings.weights_path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no weights file at {path} (--weights-path); check the path")
        return BaseModel("file", name, "pretrained", path=str(path), **fingerprint(path))
    return BaseModel("hub", name, "pretrained", **fingerprint(download_gpt2(name)))


def save_trained(model: GPTModel, settings: RunSettings, folder: Path) -> Path:
    """Write the tensors training changed into `folder`: the adapter (LoRA methods), else every trained
    parameter (all of them for full; the last block, final norm and head for last-block). A NaN or an
    infinity in them is refused, and nothing is saved."""
    trained = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    for name, tensor in trained.items():
        require_finite(tensor, name, "the trained model", advice=f"nothing was saved. {NON_FINITE_CAUSES}")
    if settings.method in LORA_METHODS:
        return save_lora(model, folder / ADAPTER_FILE, settings.lora_config, model_name=settings.model_name)
    return save_safetensors(trained, folder / TRAINED_FILE,
                            metadata={"method": settings.method, "model_name": settings.model_name})


def load_trained(model: GPTModel, record: RunRecord, run_dir: Path) -> None:
    """Put what `save_trained` wrote into `model` (the run's base, with its head): the adapter, or exactly the
    tensors the method trains, each checked against the record first."""
    if record.method in LORA_METHODS:
        if record.lora_config.quantize_base:  # QLoRA: the 4-bit base the adapter was trained with
            replace_linear_with_lora(model, record.lora_config)
        load_lora(model, checked_file(run_dir, record, ADAPTER_FILE, "the trained tensors"),
                  model_name=record.model_name)
    else:
        path = checked_file(run_dir, record, TRAINED_FILE, "the trained tensors")
        load_trained_weights(model, path, prepare_for_method(model, record.method))
