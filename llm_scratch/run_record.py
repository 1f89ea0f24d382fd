"""The run layer: what a run folder holds, its record (`RunRecord`, saved as run.json), and loading it back.

Every command that trains (`finetune`, `pretrain`, `instruct`) writes its folder through `writing_run_folder`:
a hidden folder that becomes the run folder only when complete (`llm_scratch.run_folder`), refused when the
folder holds a run and `overwrite` is not given, holds files the command does not write, or holds the run of
another command. The record is written last; it names the command, the method, the base model (with the
SHA-256 and size of its weights), the LoRA config, the settings resolved to the values the run used, and the
checksum of every file the run needs to be loaded again. It is the one module that writes or reads run.json.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm_scratch.config import GPTConfig
from llm_scratch.files import atomic_path, read_safetensors
from llm_scratch.lora import LoRAConfig, find_lora_targets
from llm_scratch.model import GPTModel
from llm_scratch.nf4 import quantize_linears
from llm_scratch.pretrained import HF_CONFIG_FILE, HF_WEIGHTS_FILE, download_gpt2, load_gpt2
from llm_scratch.run_folder import check_fingerprint, writing_run

RUN_FILE = "run.json"  # the RunRecord: how to rebuild the run's model, with the checksums of its files
RECORD_FORMAT, RECORD_VERSION = "llm-scratch-run", 3  # 3: the RunRecord; 2 and earlier: a plain dict
METRICS_FILE = "metrics.json"  # what the run measured
LOSS_FIGURE, ACCURACY_FIGURE = "loss.png", "accuracy.png"
ADAPTER_FILE = "adapter.safetensors"  # a LoRA or DoRA run's trained tensors (A, B, magnitudes, the head)
TRAINED_FILE = "weights.safetensors"  # the trained tensors of a run without LoRA (full, last-block)
QUICK_BASE_FILE = "base_tiny.safetensors"  # quick mode's base model (tiny, random weights)
SAMPLES_FILE = "samples.txt"  # pretraining: a greedy continuation after every epoch
RESPONSES_FILE = "responses.json"  # instruction tuning: the test split's responses beside the references
# Every file each command may write: a folder holding any other is not a run folder of that command.
COMMAND_FILES: dict[str, frozenset[str]] = {
    "finetune": frozenset({RUN_FILE, METRICS_FILE, LOSS_FIGURE, ACCURACY_FIGURE, ADAPTER_FILE, TRAINED_FILE,
                           QUICK_BASE_FILE}),
    "pretrain": frozenset({RUN_FILE, METRICS_FILE, LOSS_FIGURE, SAMPLES_FILE, HF_WEIGHTS_FILE,
                           HF_CONFIG_FILE}),
    "instruct": frozenset({RUN_FILE, METRICS_FILE, LOSS_FIGURE, ADAPTER_FILE, TRAINED_FILE, QUICK_BASE_FILE,
                           RESPONSES_FILE}),
}
BASE_KINDS = ("hub", "file", "random")  # where a run's starting weights came from


@dataclass(frozen=True)
class BaseModel:
    """Where a run's starting weights came from: downloaded GPT-2 ("hub"), a weights file ("file"; quick
    mode's lies inside the run folder, `path` relative to it) or a seeded random init ("random")."""

    kind: str
    model_name: str  # the preset
    note: str  # for figure titles: "pretrained", "random init", "quick mode: tiny random model"
    path: str | None = None  # kind "file": the weights file
    seed: int | None = None  # kind "random": the seed of the init
    sha256: str | None = None  # kinds "hub" and "file": the weights file's checksum and size in bytes
    size: int | None = None


@dataclass(frozen=True)
class RunRecord:
    """What a run is: enough to load its model again and to tell its files apart from any other run's."""

    command: str  # "finetune", "pretrain", ...
    method: str  # what trained: "full", "last-block", "lora", "dora", ...
    model_name: str
    quick: bool
    data: str  # what it trained on, in words
    base: BaseModel
    settings: dict  # every setting, resolved to the value the run used (epochs, lr, device, ...)
    files: dict  # file name -> {"sha256": ..., "size": ...}: the files loading the run reads
    lora_config: LoRAConfig | None = None
    labels: tuple[str, ...] | None = None  # a classifier's class names, in the order of its outputs
    max_length: int | None = None  # tokens a classifier reads of each text
    extra: dict = field(default_factory=dict)  # anything else a command records

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        record["labels"] = None if self.labels is None else list(self.labels)
        return {"format": RECORD_FORMAT, "version": RECORD_VERSION, **record}

    @property
    def setting(self) -> str:
        """What the run trained, for figure titles: "gpt2-small, SMS Spam Collection (pretrained)"."""
        return f"{self.model_name}, {self.data} ({self.base.note})"


# ---- Writing: one staged folder per run, refused when it would mix two runs ----

def check_out(out: Path, overwrite: bool, command: str, files: frozenset[str] | None = None) -> None:
    """Raise a ValueError if `out` cannot take a `command` run: the current folder or one above it, a file,
    a folder holding files the command does not write (`files`, default `COMMAND_FILES[command]`) or another
    command's run, or (unless `overwrite`) a folder that already holds a run."""
    out, here = Path(out), Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise ValueError(f"the run folder {str(out)!r} is the current folder or one above it, which a run "
                         f"would replace; give the run a folder of its own (e.g. --out runs/{command})")
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder; choose another run folder (--out)")
    other = _command_of(out)
    if other is not None and other != command:
        raise ValueError(f"{out} holds a {other} run, and {command} writes runs of its own kind; choose "
                         "another run folder (--out)")
    names = sorted(path.name for path in out.iterdir())
    foreign = [name for name in names if name not in (files or COMMAND_FILES[command])]
    if foreign:
        raise ValueError(f"{out} holds files a {command} run does not write ({', '.join(foreign[:3])}); a "
                         "run replaces its whole folder, so choose another run folder (--out) or move those "
                         "files away")
    if names and not overwrite:
        raise ValueError(f"{out} already holds a run; pass --overwrite (overwrite=True) to replace it once "
                         "the new run is complete, or choose another run folder (--out)")


def _command_of(folder: Path) -> str | None:
    """The command that wrote the run in `folder`, if its run.json says so (None: unknown)."""
    try:
        return json.loads((folder / RUN_FILE).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


@contextmanager
def writing_run_folder(out: str | Path, command: str, overwrite: bool = False,
                       files: frozenset[str] | None = None) -> Iterator[Path]:
    """A new, empty hidden folder to write a `command` run into; it replaces `out` only once the `with` block
    completes (see `llm_scratch.run_folder.writing_run`), after `check_out` accepted `out`. `files`: the names
    the command writes, for a command that is not one of COMMAND_FILES (e.g. export)."""
    if command not in COMMAND_FILES and files is None:
        raise ValueError(f"unknown command {command!r}; run folders are written by "
                         f"{', '.join(COMMAND_FILES)}")
    with writing_run(out, lambda folder: check_out(folder, overwrite, command, files)) as folder:
        yield folder


def record_path(run_dir: str | Path) -> Path:
    """Where the record of the run in `run_dir` lies (for messages; only this module reads or writes it)."""
    return Path(run_dir) / RUN_FILE


def write_record(folder: Path, record: RunRecord) -> Path:
    """Write `record` as the run.json of `folder`, after checking it reads back as itself."""
    text = json.dumps(record.to_json(), indent=2) + "\n"
    if record_from_json(json.loads(text), folder / RUN_FILE, record.command) != record:
        raise RuntimeError(f"the record of {folder} does not survive JSON (a setting that is not a number, "
                           "string, true, false or null?)")
    with atomic_path(folder / RUN_FILE) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return folder / RUN_FILE


def write_json(path: Path, content: dict) -> Path:
    """Write `content` to the JSON file `path`, all or nothing (metrics and other files of a run)."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return path


# ---- Reading: every key checked, errors that name the file and the key ----

def read_record(run_dir: str | Path, command: str | None) -> RunRecord:
    """The RunRecord of the run folder `run_dir`, which `command` must have written (None: any command); a
    ValueError naming the file and the key for anything missing or malformed, a FileNotFoundError without
    run.json."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the folder a {command or 'training'} run wrote (its "
                                "--out)")
    again = f"run {command or 'the command that wrote it'} again"  # how errors end
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the file is damaged: {again}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object ({{...}}), not a {type(raw).__name__}")
    if raw.get("format") != RECORD_FORMAT or raw.get("version") != RECORD_VERSION:
        raise ValueError(f"{path} was written by another version of llm-scratch (format "
                         f"{raw.get('format')!r}, version {raw.get('version')!r}; this one reads version "
                         f"{RECORD_VERSION}): {again}")
    record = record_from_json(raw, path, command or str(raw.get("command")))
    if command is not None and record.command != command:
        raise ValueError(f"{path} records a {record.command} run, not a {command} run; pass the folder a "
                         f"{command} run wrote")
    return record


def record_from_json(raw: dict, path: Path, command: str) -> RunRecord:
    """A RunRecord from run.json's object, every field checked (`path` names the file in errors, which
    advise to run `command` again)."""
    def get(record: dict, key: str, kind, prefix: str = "", optional: bool = False):
        return _field(record, key, kind, path, command, prefix, optional)

    base = get(raw, "base", dict)
    if get(base, "kind", str, "base.") not in BASE_KINDS:
        raise ValueError(f"{path}: the key 'base.kind' must be one of {', '.join(BASE_KINDS)}, got "
                         f"{base['kind']!r}")
    base = BaseModel(kind=base["kind"], model_name=get(base, "model_name", str, "base."),
                     note=get(base, "note", str, "base."),
                     path=get(base, "path", str, "base.", optional=base["kind"] != "file"),
                     seed=get(base, "seed", int, "base.", optional=base["kind"] != "random"),
                     **_checksum(base, path, command, "base.", optional=base["kind"] == "random"))
    files = get(raw, "files", dict)
    for name in files:
        _checksum(get(files, name, dict, "files."), path, command, f"files.{name}.")
    lora = get(raw, "lora_config", dict, optional=True)
    try:
        lora_config = None if lora is None else LoRAConfig(**lora)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: the key 'lora_config' is not a valid LoRA config ({error})") from None
    labels = get(raw, "labels", list, optional=True)
    if labels is not None and (len(labels) < 2 or not all(isinstance(label, str) for label in labels)):
        raise ValueError(f"{path}: the key 'labels' must list at least two class names, got {labels!r:.60}")
    max_length = get(raw, "max_length", int, optional=True)
    if max_length is not None and max_length < 1:
        raise ValueError(f"{path}: the key 'max_length' must be a positive number of tokens")
    return RunRecord(command=get(raw, "command", str), method=get(raw, "method", str),
                     model_name=get(raw, "model_name", str), quick=get(raw, "quick", bool),
                     data=get(raw, "data", str), base=base, settings=get(raw, "settings", dict), files=files,
                     lora_config=lora_config, labels=None if labels is None else tuple(labels),
                     max_length=max_length, extra=get(raw, "extra", dict))


def _field(record: dict, key: str, kind: type, path: Path, command: str, prefix: str = "",
           optional: bool = False):
    """`record[key]`, checked to be a `kind` (True and False do not count as int); None allowed if
    `optional`."""
    if key not in record:
        raise ValueError(f"{path}: the key {prefix + key!r} is missing; the file is damaged or was written "
                         f"by another version of llm-scratch: run {command} again")
    value = record[key]
    if optional and value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{path}: the key {prefix + key!r} must be a {kind.__name__}, got {value!r:.60}; "
                         f"the file is damaged or was edited: run {command} again")
    return value


def _checksum(record: dict, path: Path, command: str, prefix: str, optional: bool = False) -> dict:
    """{"sha256": ..., "size": ...} of `record`, checked (both None if `optional` and absent)."""
    digest = _field(record, "sha256", str, path, command, prefix, optional)
    if digest is not None and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
        raise ValueError(f"{path}: the key {prefix + 'sha256'!r} is not a SHA-256 hex digest "
                         f"({digest!r:.70})")
    size = _field(record, "size", int, path, command, prefix, optional)
    if size is not None and size < 0:
        raise ValueError(f"{path}: the key {prefix + 'size'!r} must be a file size in bytes, not negative")
    return {"sha256": digest, "size": size}


# ---- Loading: the base a run started from, its files checked against the record ----

def checked_file(run_dir: Path, record: RunRecord, name: str, what: str) -> Path:
    """The path of the run's file `name` (`what` it holds, for messages), after checking it is the file the
    record names (size, SHA-256)."""
    if name not in record.files:
        raise ValueError(f"{Path(run_dir) / RUN_FILE} lists no file {name!r} ({what}); the file is damaged "
                         f"or was edited: run {record.command} again")
    path = Path(run_dir) / name
    check_fingerprint(path, record.files[name], what, record.command)
    return path


def load_base(base: BaseModel, run_dir: Path, device: torch.device, *, command: str,
              verify: bool = True, lora_config: LoRAConfig | None = None) -> GPTModel:
    """The model a run started from: GPT-2's weights (downloaded or a file) or the same random init.

    With `verify`, the weights file must have the SHA-256 and size recorded (a run that has just hashed the
    file passes `verify=False`: a file is hashed once per run). With a QLoRA `lora_config`, the blocks' Linear
    layers it targets come out in 4-bit NF4, quantized block by block as they are read (a file or the Hub),
    so that the float32 base is never whole in memory."""
    nf4_layers = _nf4_layers(base.model_name, lora_config)
    if base.kind == "random":
        torch.manual_seed(base.seed)
        model = GPTModel(GPTConfig.from_preset(base.model_name)).to(device)
        quantize_linears(model, nf4_layers)
        return model
    path = download_gpt2(base.model_name) if base.kind == "hub" else Path(run_dir) / base.path
    if verify:
        check_fingerprint(path, {"sha256": base.sha256, "size": base.size}, "the base model's weights",
                          command)
    return load_gpt2(base.model_name, weights_path=path, device=device, nf4_layers=nf4_layers)


def _nf4_layers(model_name: str, lora_config: LoRAConfig | None) -> list[str]:
    """The Linear layers of the blocks that a QLoRA config targets (none for other configs), found on a
    shapes-only model. `replace_linear_with_lora` wraps them as they are, and quantizes any other target."""
    if lora_config is None or not lora_config.quantize_base:
        return []
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_preset(model_name))
    return [name for name in find_lora_targets(model, lora_config) if name.startswith("blocks.")]


def load_trained_weights(model: GPTModel, path: str | Path, names: list[str]) -> None:
    """Load the trained tensors of a full or last-block run strictly: exactly the parameters `names`, each
    with its shape, none NaN or infinite; the model's other tensors stay those of its base."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters() if name in set(names)}
    trained = read_safetensors(path, device=model.tok_emb.weight.device)  # refuses NaN and infinity
    found = {name: tuple(tensor.shape) for name, tensor in trained.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        reshaped = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        raise ValueError(f"{path} does not hold exactly the tensors the run trained: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {reshaped[:3]}; the file is damaged or "
                         f"from another run: train it again")
    model.load_state_dict(trained, strict=False)  # not strict: the other tensors are the base model's
