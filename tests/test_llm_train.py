"""SFT wrapper (recalign.llm.train): completion-only labels on token level, loss falls, adapters reload."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from recalign.errors import ConfigError  # noqa: E402
from recalign.llm.generate import GenerationConfig, generate  # noqa: E402
from recalign.llm.trainer import LoraConfig
from recalign.llm.models import load_model, save_model, tiny_model  # noqa: E402
from recalign.llm.tasks import SeqRecTask, parse_title, rows_from_sequences, sft_examples  # noqa: E402
from recalign.llm.train import SFTConfig, make_sft_trainer, train_sft  # noqa: E402

TITLES = ["Dune", "Emma", "Ulysses", "Beloved", "Hamlet", "Walden"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


def test_labels_mask_exactly_the_prompt_tokens(tiny, tmp_path):
    model, tokenizer = tiny
    rows = rows_from_sequences([[0, 1, 2], [3, 4, 5, 0]], max_history=3)
    examples = sft_examples(SeqRecTask(), rows, TITLES, tokenizer)  # real chat template, real tokenizer
    trainer = make_sft_trainer(model, tokenizer, examples, SFTConfig(max_steps=1), output_dir=tmp_path)
    data = trainer.train_dataset
    assert len(data) == 2
    for example, row in zip(examples, data):
        prompt_ids = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        ids, labels = row["input_ids"], row["labels"]
        assert ids[:n] == prompt_ids                                   # the prompt is tokenized as at inference
        assert labels[:n] == [-100] * n                                # no loss on any prompt token
        assert labels[n:] == ids[n:]                                   # loss on every completion token ...
        assert tokenizer.decode(ids[n:]) == example["completion"] + tokenizer.eos_token  # ... and on EOS
    # The collator pads and keeps the prompt masked (EOS doubles as pad: the completion's EOS must stay a label).
    batch = trainer.data_collator([dict(r) for r in data])
    for i, row in enumerate(data):
        n_pad = batch["labels"].shape[1] - len(row["input_ids"])
        labels = batch["labels"][i].tolist()
        real = labels[:len(row["input_ids"])] if n_pad >= 0 else labels
        assert real == row["labels"]
        assert labels[len(row["input_ids"]):] == [-100] * n_pad
        assert row["labels"][-1] == tokenizer.eos_token_id


def _padding_per_epoch(trainer) -> tuple[int, int]:
    """(padded slots, real tokens) over one pass of the trainer's own train dataloader."""
    padded = real = 0
    for batch in trainer.get_train_dataloader():
        mask = batch["attention_mask"]
        padded += int((mask == 0).sum())
        real += int(mask.sum())
    return padded, real


def test_length_grouped_batches_train_on_less_padding(tiny, tmp_path):
    """`length_grouped`: the same examples (same real tokens), fewer padded slots than random batches."""
    model, tokenizer = tiny
    sequences = [[i % 6] * (1 + (i * 7) % 10) + [(i + 1) % 6] for i in range(64)]  # histories of 1..10 items
    rows = rows_from_sequences(sequences, max_history=10)
    examples = sft_examples(SeqRecTask(), rows, TITLES, tokenizer)
    found = {}
    for grouped in (False, True):
        settings = SFTConfig(max_steps=1, batch_size=8, length_grouped=grouped, max_length=512)
        found[grouped] = _padding_per_epoch(make_sft_trainer(model, tokenizer, examples, settings,
                                                             output_dir=tmp_path / str(grouped)))
    assert found[True][1] == found[False][1]  # every example once either way
    assert found[True][0] < 0.3 * found[False][0], found


def test_length_grouped_order_is_a_seeded_permutation_of_similar_length_batches():
    from recalign.llm.train import length_grouped_order

    lengths = [(i * 37) % 101 for i in range(64)]
    order = length_grouped_order(lengths, 8, seed=3)
    assert sorted(order) == list(range(64)) and order == length_grouped_order(lengths, 8, seed=3)
    assert order != length_grouped_order(lengths, 8, seed=4)
    spans = [max(lengths[i] for i in order[b:b + 8]) - min(lengths[i] for i in order[b:b + 8]) for b in range(0, 64, 8)]
    assert max(spans) <= 20  # one window: batches of neighbours in the sorted lengths (0..100 over 64 examples)


def test_without_completion_only_every_token_is_a_label(tiny, tmp_path):
    model, tokenizer = tiny
    examples = [{"prompt": "Dune Emma ->", "completion": ' "Ulysses"'}]
    trainer = make_sft_trainer(model, tokenizer, examples, SFTConfig(max_steps=1, completion_only=False),
                               output_dir=tmp_path)
    row = trainer.train_dataset[0]
    assert row["labels"] == row["input_ids"]


def _short_examples():
    """6 prompts 'A B ->' whose answer is the title two places further along (a fixed, learnable mapping)."""
    return [{"prompt": f"{TITLES[i]} {TITLES[(i + 1) % 6]} ->", "completion": f' "{TITLES[(i + 2) % 6]}"'}
            for i in range(6)]


def test_lora_sft_loss_falls_and_the_model_learns_the_titles(tmp_path):
    model, tokenizer = tiny_model(seed=0)
    examples = _short_examples()
    prompts = [e["prompt"] for e in examples]
    targets = [TITLES[(i + 2) % 6] for i in range(6)]
    with torch.no_grad():
        base_logits = model(input_ids=tokenizer(prompts[0], return_tensors="pt", add_special_tokens=False)
                            ["input_ids"]).logits
    before = [parse_title(a[0]) for a in generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6))]
    settings = SFTConfig(learning_rate=1e-2, max_steps=15, batch_size=6, seed=0)
    result = train_sft(model, tokenizer, examples, settings, output_dir=tmp_path / "scratch",
                       lora=LoraConfig(r=8, alpha=16, dropout=0.0))
    losses = result.losses
    assert len(losses) == 15
    assert losses[-1] < losses[0] - 0.5
    assert result.summary()["sft_steps"] == 15
    assert result.model.config.use_cache  # the Trainer turns the KV cache off; generation needs it back
    after = [parse_title(a[0]) for a in generate(result.model, tokenizer, prompts,
                                                 GenerationConfig(max_new_tokens=6))]
    hits_before = sum(a == t for a, t in zip(before, targets))
    hits_after = sum(a == t for a, t in zip(after, targets))
    assert hits_before == 0 and hits_after >= 3
    # LoRA: the base weights did not move (adapter off = the untrained model's logits)
    ids = tokenizer(prompts[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad(), result.model.disable_adapter():
        assert torch.equal(result.model(input_ids=ids).logits, base_logits)
    # The saved adapter on the same (seeded) tiny base reproduces the answers.
    save_model(result.model, tokenizer, tmp_path / "adapter")
    reloaded, _ = load_model("tiny", seed=0, adapter=tmp_path / "adapter", progress=False)
    again = [parse_title(a[0]) for a in generate(reloaded, tokenizer, prompts, GenerationConfig(max_new_tokens=6))]
    assert again == after


def test_bad_examples_are_config_errors(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(ConfigError, match="at least one"):
        train_sft(model, tokenizer, [], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="missing field"):
        train_sft(model, tokenizer, [{"prompt": "x"}], output_dir=tmp_path)


# ---- the "llm-sft" recipe stage -------------------------------------------------------------------------------

def test_llm_sft_stage_runs_end_to_end_and_constrained_answers_are_titles(tmp_path):
    import json

    import numpy as np
    import pandas as pd

    from recalign.recipes import recipe_from_dict
    from recalign.data.dataset import build_dataset
    from recalign.runs import run_recipe

    rng = np.random.default_rng(0)
    frame = pd.DataFrame([(f"u{u}", f"i{int(rng.integers(6))}", t) for u in range(6) for t in range(5)],
                         columns=["user", "item", "timestamp"])
    items = pd.DataFrame({"item": [f"i{i}" for i in range(6)], "title": TITLES})
    build_dataset(frame, items=items, name="toy", source="test").save(tmp_path / "data")
    stage_params = {
        "model": "tiny", "train_rows": 4, "batch_size": 3,
        "task": {"max_history": 3}, "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "sft": {"max_steps": 2, "batch_size": 2, "max_length": 160},
        "generation": {"max_new_tokens": 8}, "decodings": ["greedy", "constrained"],
        "grounding": {"kind": "fuzzy"},
    }
    recipe = recipe_from_dict({"name": "llm", "seed": 1, "data": {"path": str(tmp_path / "data")},
                               "eval": {"ks": [1, 5], "users": 3},
                               "stages": [{"name": "sft", "kind": "llm-sft", "params": stage_params}]})
    summary = run_recipe(recipe, tmp_path / "run", progress=False)
    metrics = summary["stages"]["sft"]
    assert metrics["train_rows"] == 4 and metrics["n_rows"] == 3 and metrics["sft_steps"] == 2
    assert metrics["constrained.valid_title_rate"] == 1.0  # the trie admits catalog titles only
    assert 0.0 <= metrics["hr@1"] <= metrics["hr@5"] <= 1.0
    assert {"ndcg@5", "valid_title_rate", "constrained.hr@5", "constrained.ndcg@5"} <= set(metrics)
    stage_dir = tmp_path / "run" / "stages" / "sft"
    assert (stage_dir / "model" / "adapter_config.json").is_file()
    assert not (stage_dir / "scratch").exists()
    lines = [json.loads(line) for line in (stage_dir / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    assert all(parse_title(line["answer_constrained"]) in TITLES for line in lines)
    # `recalign eval` path: the saved adapter, evaluated again, gives the same numbers.
    from recalign.methods.llm_sft.stage import reevaluate_llm_stage
    from recalign.methods.llm_sft.config import LLMSFTConfig
    from recalign.stages import RunContext
    from recalign.runs import open_run

    recipe, dataset, split = open_run(tmp_path / "run")
    ctx = RunContext(run_dir=tmp_path / "run", stage_dir=stage_dir, dataset=dataset, split=split, seed=recipe.seed,
                     progress=False, recipe=recipe, stage=recipe.stages[0])
    again = reevaluate_llm_stage(ctx, LLMSFTConfig(**recipe.stages[0].params))
    for key in ("hr@1", "hr@5", "ndcg@5", "valid_title_rate", "constrained.hr@5", "constrained.valid_title_rate"):
        assert again[key] == metrics[key], key


def test_evaluate_answers_one_title_and_list_answers_by_hand():
    import math

    from recalign.llm.grounding import ExactGrounder
    from recalign.llm.answers import evaluate_answers

    rows = rows_from_sequences([[0, 1, 2], [1, 2, 3], [2, 3, 4]])  # targets 2, 3, 4
    grounder = ExactGrounder(TITLES)
    one, lists = evaluate_answers(['"Ulysses"', 'Sure: "Hamlet"', "nothing"], rows, TITLES, grounder, (1, 2),
                                  SeqRecTask())
    assert lists[:, 0].tolist() == [2, 4, -1]
    assert one["hr@1"] == pytest.approx(1 / 3) and one["hr@2"] == pytest.approx(1 / 3)
    assert one["valid_title_rate"] == pytest.approx(2 / 3) and one["n_rows"] == 3
    listed, lists = evaluate_answers(['1. "Emma"\n2. "Ulysses"', '1. "Beloved"', ""], rows, TITLES, grounder,
                                     (1, 2), SeqRecTask(k=2))
    assert lists.tolist() == [[1, 2], [3, -1], [-1, -1]]
    assert listed["hr@1"] == pytest.approx(1 / 3) and listed["hr@2"] == pytest.approx(2 / 3)
    assert listed["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1) / 3)
