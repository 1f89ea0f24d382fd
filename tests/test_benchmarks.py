"""The benchmark scripts run (tiny shapes, a few steps); the real tables are made by hand."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch

from llm_scratch import PRESETS, GPTConfig, GPTModel, get_tokenizer
from llm_scratch.pretrained import save_gpt2_safetensors

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def markdown_rows(text: str) -> dict[str, list[str]]:
    """Every row of the markdown tables in `text`: its first cell -> its other cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            first, *rest = (cell.strip() for cell in line.strip().strip("|").split("|"))
            rows[first] = rest
    return rows


def test_bench_finetune_smoke(capsys, benchmark_script):
    bench = benchmark_script("bench_finetune")
    results = bench.main(["--smoke"])  # tiny shape, batch 8 x 16 tokens, LoRA rank 16, fixed padding to 256
    batch_size, rank, fixed_pad = 8, 16, 256  # 256: the tiny preset's context, as long as any message gets
    rows = markdown_rows(capsys.readouterr().out)
    step, memory, tokens, epoch = (results[key] for key in ("step_s", "peak_mb", "epoch_tokens", "epoch_s"))

    # The tables print the returned numbers, and each ratio is the quotient of the two numbers it names.
    assert list(step) == list(bench.MODELS)
    for name in bench.MODELS:
        assert rows[name][0] == f"{step[name]:.3f} s", name
    assert set(memory) == {"ours full", "ours lora"}  # smoke mode measures our two models only
    assert memory["ours lora"] < memory["ours full"]
    quotients = {
        "ours full / HF full (step time)": step["ours full"] / step["hf full"],
        "ours LoRA / HF + PEFT LoRA (step time)": step["ours lora"] / step["hf+peft lora"],
        "ours LoRA / ours full (step time)": step["ours lora"] / step["ours full"],
        "ours LoRA / ours full (peak memory)": memory["ours lora"] / memory["ours full"],
    }
    for row, quotient in quotients.items():
        assert rows[row] == [f"{quotient:.2f}"], row
    flops_row = next(values for first, values in rows.items() if first.startswith("our full step:"))
    assert flops_row == [f"{results['step_gflops'] / results['matmul_gflops']:.2f}"]

    # Tokens of one epoch, from the training messages' lengths alone: the three batchings must differ so.
    cfg = PRESETS["tiny"]
    tokenizer = get_tokenizer()
    train = bench.load_spam_splits(quick=True, write_csv=False).train  # the benchmark's own data set
    lengths = sorted(min(len(tokenizer.encode_ordinary(text)), cfg.context_length) for text, _ in train)
    assert len(lengths) <= batch_size * 50  # one pool of LengthBucketSampler: bucketing sorts all by length
    sorted_batches = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    fixed = f"fixed {fixed_pad}-token padding"
    assert list(tokens) == list(epoch) == [fixed, "dynamic padding", "length-bucketed batches"]
    assert tokens[fixed] == fixed_pad * len(lengths)
    assert tokens["length-bucketed batches"] == sum(len(batch) * max(batch) for batch in sorted_batches)
    # Random batches pad to their longest message: no fewer tokens than sorted batches, no more than the
    # longest message everywhere.
    assert tokens["length-bucketed batches"] <= tokens["dynamic padding"] <= max(lengths) * len(lengths)
    assert max(lengths) <= fixed_pad and tokens["dynamic padding"] < tokens[fixed]
    for name, seconds in epoch.items():
        assert rows[name] == [f"{seconds:.1f} s", f"{tokens[name]:,}", f"{epoch[fixed] / seconds:.2f}x"], name

    expected = expected_trainable("tiny", rank)
    assert results["trainable"] == {name: expected[name] for name in bench.MODELS}


def expected_trainable(preset: str, rank: int, n_classes: int = 2) -> dict[str, int]:
    """Trainable parameters of each benchmark model, from GPT-2's and LoRA's formulas (A: in x rank, B: rank x
    out; DoRA: one magnitude per output feature of each wrapped layer)."""
    cfg = PRESETS[preset]
    d, n_layers = cfg.emb_dim, cfg.n_layers
    ours_linears = [(d, d)] * 4 + [(d, 4 * d), (4 * d, d)]  # W_query, W_key, W_value, out_proj, fc1, fc2
    hf_linears = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]  # c_attn (q, k, v fused), c_proj, c_fc, c_proj
    block = sum(n_in * n_out + n_out for n_in, n_out in ours_linears) + 2 * 2 * d  # + two LayerNorms
    body = (cfg.vocab_size + cfg.context_length) * d + n_layers * block + 2 * d  # embeddings, blocks, norm
    head = d * n_classes  # no bias, ours as Hugging Face's `score`
    counts = {"ours full": body + head, "hf full": body + head}  # the same model
    for name, linears in (("ours", ours_linears), ("hf+peft", hf_linears)):
        lora = n_layers * sum(rank * (n_in + n_out) for n_in, n_out in linears)
        magnitudes = n_layers * sum(n_out for _, n_out in linears)
        counts[f"{name} lora"], counts[f"{name} dora"] = lora + head, lora + magnitudes + head
    return counts


def test_bench_dora_smoke(capsys, benchmark_script):
    bench = benchmark_script("bench_dora")
    results = bench.main(["--smoke"])  # tiny shape, batch 8 x 16 tokens, rank 16, LoRA+ ratio 16
    rows = markdown_rows(capsys.readouterr().out)
    step, memory = results["step_s"], results["peak_mb"]
    assert list(step) == list(bench.MODELS)
    for name in bench.MODELS:
        shown = f"{memory[name]:,.0f} MB" if name in memory else "-"
        assert rows[name] == [f"{step[name]:.3f} s", shown], name
    # Each step-time ratio is the median over the rounds of the two steps' ratio in that round.
    times = results["step_times"]
    assert all(len(t) == 2 for t in times.values())  # smoke mode: two rounds after one warm-up
    assert step == {name: statistics.median(t) for name, t in times.items()}
    for row, (top, bottom) in bench.RATIOS.items():
        paired = statistics.median(a / b for a, b in zip(times[top], times[bottom], strict=True))
        assert rows[f"{row} (step time, median of per-round ratios)"] == [f"{paired:.2f}"], row
    memory_row = rows["ours DoRA / HF + PEFT DoRA (peak memory)"]
    assert memory_row == [f"{memory['ours dora'] / memory['hf+peft dora']:.2f}"]
    expected = expected_trainable("tiny", rank=16)
    assert results["trainable"] == {name: expected[name.removesuffix("+")] for name in bench.MODELS}
    assert results["loraplus_lrs"] == pytest.approx([1e-5, 16e-5])  # A, B (1-D tensors too)


def test_bench_pretrain_smoke(capsys, benchmark_script):
    bench = benchmark_script("bench_pretrain")
    results = bench.main(["--smoke"])  # tiny shape, batch 2 x 16 tokens, 1 warm-up step and 2 timed ones
    rows = markdown_rows(capsys.readouterr().out)
    step, tokens = results["step_s"], results["tokens_per_step"]
    assert tokens == 2 * 16

    # The table prints the returned numbers: medians of the timed steps, tokens per second, their ratio.
    for name in bench.MODELS:
        assert len(results["seconds"][name]) == 2
        assert step[name] == statistics.median(results["seconds"][name])
        assert rows[bench.LABELS[name]][:2] == [f"{step[name]:.3f} s", f"{tokens / step[name]:,.0f}"]
    assert rows["ours / Hugging Face (step time)"] == [f"{step['ours'] / step['hf']:.2f}"]

    # The two models are the same model: GPT-2's parameter count of the tiny shape, the tied head once.
    cfg = PRESETS["tiny"]
    d = cfg.emb_dim
    expected = (cfg.vocab_size + cfg.context_length) * d + cfg.n_layers * (12 * d * d + 13 * d) + 2 * d
    assert results["parameters"] == {"ours": expected, "hf": expected}
    # Same weights, same batch, same maths: the same loss at every step, starting from a uniform guess over
    # the vocabulary and falling as AdamW fits the one batch.
    ours, hf = results["losses"]["ours"], results["losses"]["hf"]
    assert len(ours) == len(hf) == 3
    assert max(abs(a - b) for a, b in zip(ours, hf, strict=True)) < 1e-4
    assert abs(ours[0] - math.log(cfg.vocab_size)) < 0.5
    assert ours[2] < ours[1] < ours[0]
    for i, (a, b) in enumerate(zip(ours, hf, strict=True), start=1):
        assert rows[str(i)] == [f"{a:.5f}", f"{b:.5f}"]


def test_bench_last_block_smoke(capsys, benchmark_script):
    bench = benchmark_script("bench_last_block")
    results = bench.main(["--smoke"])  # tiny shape, quick data, batch 8, checks every 5 steps, one round
    rows = markdown_rows(capsys.readouterr().out)
    ordinary, cached = (results["epoch_s"][name] for name in bench.PATHS)
    assert rows[bench.LABELS["ordinary"]] == [f"{ordinary:.2f} s", "1.00x"]
    assert rows[bench.LABELS["cached"]] == [f"{cached:.2f} s", f"{ordinary / cached:.2f}x"]
    whole_run = 5 * ordinary / (results["cache_s"] + 5 * cached)  # finetune's 5 epochs, the cache included
    assert rows["5 epochs (finetune's default), cache included: ordinary / cached"] == [f"{whole_run:.2f}x"]

    # What was cached, from the data alone: the embeddings and block 0 of the tiny preset's 2 blocks, for
    # every message of the three splits, each as many fp32 vectors of 64 numbers as it has tokens.
    splits = bench.load_spam_splits(quick=True)
    loaders = bench.spam_dataloaders(splits, context_length=PRESETS["tiny"].context_length)
    lengths = [n for loader in loaders[:3] for n in loader.dataset.lengths]
    assert len(lengths) == 500
    assert (results["n_blocks"], results["n_layers"], results["messages"]) == (1, 2, 500)
    assert results["cache_mb"] == sum(lengths) * 64 * 4 / 2**20
    assert results["steps"] == math.ceil(len(splits.train) / 8) == 44
    assert rows["blocks in the cached prefix (with the embeddings)"] == ["1 of 2"]
    cache_row = rows["computing the cache once (500 messages of the three splits)"]
    assert cache_row == [f"{results['cache_s']:.2f} s"]
    assert rows["the cache's memory (fp32, unpadded)"] == [f"{results['cache_mb']:,.1f} MB"]
    # The same weights and batches: the same losses but for float rounding.
    assert results["loss_difference"] < 1e-4
    assert rows["largest step-loss difference (44 steps)"] == [f"{results['loss_difference']:.1e}"]


def test_bench_full_mode_times_every_method_per_position(benchmark_script):
    bench = benchmark_script("bench_full_mode")
    base = bench.add_classification_head(bench.GPTModel(bench.GPTConfig.from_preset("tiny")))
    models = {}
    for method in bench.METHODS:
        models[method] = bench.copy.deepcopy(base)
        bench.prepare_for_method(models[method], method)
    splits = bench.load_spam_splits(quick=True)
    batches = [batch for batch, _ in zip(bench.spam_dataloaders(splits, context_length=256).train, range(3),
                                         strict=False)]
    before = {name: p.detach().clone() for name, p in models["full"].named_parameters()}
    per_step, per_eval = bench.step_seconds(models, batches)
    assert list(per_step) == list(bench.METHODS) and all(t > 0 for t in per_step.values())
    assert list(per_eval) == ["lora", "qlora"] and all(t > 0 for t in per_eval.values())
    moved = [name for name, p in models["full"].named_parameters() if not bench.torch.equal(p, before[name])]
    assert moved  # the timed steps really trained


def test_bench_precision_smoke(capsys, benchmark_script):
    import torch

    from llm_scratch.precision import device_supports

    if not device_supports("bf16", torch.device("cpu")):
        pytest.skip("this CPU has no bfloat16 arithmetic")
    bench = benchmark_script("bench_precision")
    results = bench.main(["--smoke"])  # tiny shape, batch 8 x 16 tokens, 2 timed rounds
    rows = markdown_rows(capsys.readouterr().out)
    times = results["step_times"]
    assert set(times) == {"lora fp32", "lora bf16", "full fp32", "full bf16"}
    assert all(len(t) == 2 for t in times.values())
    for method in ("lora", "full"):  # each ratio: the median of the per-round ratios it names
        bf16, fp32 = times[f"{method} bf16"], times[f"{method} fp32"]
        ratio = statistics.median(b / f for b, f in zip(bf16, fp32, strict=True))
        assert results["ratios"][method] == ratio
        assert rows[method] == [f"{statistics.median(times[f'{method} fp32']):.3f} s",
                                f"{statistics.median(times[f'{method} bf16']):.3f} s", f"{ratio:.2f}"]
    profile = results["profile_s"]
    assert "aten::mm" in profile or "aten::addmm" in profile
    share = sum(t for op, t in profile.items() if op in bench.MATMUL_OPS) / sum(profile.values())
    assert results["profile_matmul_share"] == share and 0 < share < 1
    top = sorted(profile, key=lambda op: -profile[op])[:12]
    assert [op.strip("`") for op in rows if op.startswith("`")] == top


def test_bench_qlora_smoke(capsys, benchmark_script):
    bench = benchmark_script("bench_qlora")
    results = bench.main(["--smoke"])  # tiny shape, batch 8 x 16 tokens; memory of LoRA and QLoRA in fp32
    rows = markdown_rows(capsys.readouterr().out)
    memory = results["memory"]["fp32"]
    assert list(memory) == ["LoRA", "QLoRA"]
    for name, m in memory.items():
        assert m["before_step_mb"] <= m["step_peak_mb"] <= m["process_peak_mb"]
        assert rows[f"{name}, fp32"] == [f"{m[key]:,.0f} MB" for key in
                                         ("step_peak_mb", "before_step_mb", "process_peak_mb")]
    ratio = memory["QLoRA"]["step_peak_mb"] / memory["LoRA"]["step_peak_mb"]
    assert rows["QLoRA / LoRA, fp32"] == [f"{ratio:.2f}"]
    for precision, times in results["step_times"].items():
        assert list(times) == list(bench.TIMED_MODELS)
        for name, seconds in times.items():
            assert len(seconds) == 2 and results["step_s"][precision][name] == statistics.median(seconds)
        per_round = [q / lo for q, lo in zip(times["QLoRA"], times["LoRA"], strict=True)]
        assert results["ratios"][precision]["QLoRA"] == statistics.median(per_round)
        assert rows[f"QLoRA ({precision})"] == [f"{statistics.median(times['QLoRA']):.3f} s",
                                                f"{statistics.median(per_round):.2f}"]
    # The profile: QLoRA dequantizes in forward and again in backward, LoRA never; the parts add up.
    profiles = results["profile_s"]
    assert list(profiles) == list(bench.TIMED_MODELS)
    dequantization = {name: (parts["dequantization in forward"], parts["dequantization in backward"])
                      for name, parts in profiles.items()}
    assert dequantization["LoRA"] == (0, 0)
    assert all(min(dequantization[name]) > 0 for name in bench.TIMED_MODELS[1:])
    for parts in profiles.values():
        assert math.isclose(sum(v for k, v in parts.items() if k != "total"), parts["total"], rel_tol=1e-9)
    for part in profiles["LoRA"]:
        assert rows[part] == [f"{profiles[name][part]:.3f} s" for name in bench.TIMED_MODELS]


def test_bench_qlora_builds_the_4_bit_model_block_by_block_with_the_same_trained_parameters(benchmark_script):
    import torch

    from llm_scratch.lora import lora_layers
    from llm_scratch.nf4 import LinearNF4

    bench = benchmark_script("bench_qlora")
    models = {name: bench.build(name, PRESETS["tiny"], 16, 16) for name in ("LoRA", "QLoRA + checkpointing")}
    lora, qlora = models.values()
    assert all(type(layer.linear) is torch.nn.Linear for layer in lora_layers(lora).values())
    assert all(isinstance(layer.linear, LinearNF4) for layer in lora_layers(qlora).values())
    assert (lora.checkpointing, qlora.checkpointing) == (False, True)
    trained = {name: [n for n, p in model.named_parameters() if p.requires_grad]
               for name, model in models.items()}
    assert trained["LoRA"] == trained["QLoRA + checkpointing"]
    assert len(trained["LoRA"]) == 2 * 12 + 1  # A and B of 12 layers, and the head
    with torch.no_grad():  # the same random weights, one model in 4 bits: close outputs, not equal ones
        ids = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0))
        difference = (lora(ids) - qlora(ids)).abs().max()
    assert 0 < difference < 1


def test_bench_qlora_load_reads_the_4_bit_base_without_its_float32_blocks(capsys, tmp_path, benchmark_script):
    """24 blocks of 512 wide (289 MB of float32) and a small vocabulary: the blocks are the memory. Read in
    float32, the process grows by at least the float32 blocks; read in 4 bits, by the 4-bit blocks (37 MB),
    one block in float32 and what the allocator keeps."""
    bench = benchmark_script("bench_qlora_load")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=256, context_length=64, emb_dim=512, n_heads=8, n_layers=24))
    weights = save_gpt2_safetensors(model, tmp_path / "model.safetensors")
    float32_mb = sum(p.numel() for p in model.blocks.parameters()) * 4 / 2**20
    del model
    figures = bench.main(["--weights", str(weights)])  # each way in a fresh process
    rows = markdown_rows(capsys.readouterr().out)
    assert list(figures) == list(bench.WAYS)
    for way, f in figures.items():
        assert 0 < f["before_mb"] <= f["peak_mb"] and f["seconds"] > 0
        assert rows[way] == [f"{f['before_mb']:,.0f} MB", f"{f['peak_mb']:,.0f} MB",
                             f"{f['peak_mb'] - f['before_mb']:,.0f} MB", f"{f['seconds']:.1f} s"]
    growth = {way: f["peak_mb"] - f["before_mb"] for way, f in figures.items()}
    assert growth["float32"] > float32_mb
    assert growth["float32, then quantized"] > float32_mb
    assert growth["4-bit while reading"] < 0.5 * float32_mb, growth
    # The two 4-bit ways hold the same tensors: fewer elements than float32 (two codes per byte).
    parameters = [f["parameters"] for f in figures.values()]
    assert parameters[1] == parameters[2] < parameters[0]


def test_bench_instruct_smoke(capsys, benchmark_script):
    bench = benchmark_script("bench_instruct")
    results = bench.main(["--smoke"])  # tiny shape, 2 rounds on the real split's first batches
    rows = markdown_rows(capsys.readouterr().out)
    seconds = results["seconds"]
    assert all(len(times) == 2 for times in seconds.values()) and results["steps_per_epoch"] == 117  # 935 / 8
    for name, times in seconds.items():
        assert rows[name] == [f"{statistics.median(times):.2f} s", f"{results['epoch_s'][name] / 60:.1f} min"]
        assert results["epoch_s"][name] == pytest.approx(statistics.mean(times) * 117)
    for precision, ratio in results["ratios"].items():
        paired = statistics.median(a / b for a, b in zip(seconds[f"ours {precision}"],
                                                          seconds[f"hf+peft {precision}"], strict=True))
        assert ratio == paired and rows[f"ours / HF + PEFT, {precision}"] == [f"{paired:.2f}"]
    # Both models saw the same batches: their first losses are those of random models, near ln(50,257).
    assert all(abs(losses[0] - 10.8) < 0.5 for losses in results["losses"].values())
