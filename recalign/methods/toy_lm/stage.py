"""Recipe kind "toy-lm": a tiny language model that has learned the recipe's own world, for demos and tests.

    vocabulary <- catalog words, each title as one token, the shared prompt templates   (recalign.llm.toy)
    θ          <- random Llama (`layers` x `hidden`), seeded
    θ          <- causal-LM pre-training on the train part: windows of each user's titles, item texts
    metrics    <- θ as a recommender: the next-title distribution after a user's quoted history, every title
                  scored at once (one forward pass per user), through the recipe's evaluator
    saved      <- <stage>/model, an ordinary Hugging Face folder (weights, tokenizer, chat template)

Later LLM stages fine-tune it by naming it: `model: stage:<this stage's name>`. They run the same code as with
SmolLM2 (LoRA SFT, DPO, PPO, ...); only the base model is small enough to learn in seconds.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from recalign.errors import ConfigError
from recalign.methods.toy_lm.config import ToyLMConfig
from recalign.stages import Stage

if TYPE_CHECKING:
    from recalign.data.dataset import UserSequences
    from recalign.stages import RunContext


class NextTitleScorer:
    """A causal LM whose titles are single tokens, as a score-based recommender: the score of every item is the
    logit of its title token after the user's history written as the prompts write it ('"A", "B", "')."""

    def __init__(self, model, tokenizer, titles: list[str], max_history: int = 10, batch_size: int = 64):
        import torch

        self.model, self.tokenizer, self.titles = model, tokenizer, titles
        self.max_history, self.batch_size = max_history, batch_size
        ids = tokenizer.convert_tokens_to_ids(titles)
        if any(i == tokenizer.unk_token_id for i in ids):
            raise ConfigError("toy-lm: every title must be one token of the tokenizer")
        self.title_ids = torch.tensor(ids)

    def score(self, users, history: "UserSequences") -> torch.Tensor:
        """Scores [len(users), n_items]: next-token logits restricted to the title tokens."""
        import numpy as np
        import torch

        from recalign.llm.prompts import quoted

        texts = [quoted([self.titles[i] for i in history[int(u)][-self.max_history:]]) + ', "'
                 for u in np.asarray(users)]
        out = []
        self.tokenizer.padding_side = "left"  # the last position is every row's next title (RoPE: offsets cancel)
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                     add_special_tokens=False)
                logits = self.model(**enc).logits[:, -1, :]
                out.append(logits[:, self.title_ids].float())
        return torch.cat(out) if out else torch.zeros(0, len(self.titles))


def run_toy_lm_stage(ctx: "RunContext", params: ToyLMConfig) -> dict:
    """Build the vocabulary, pre-train the model from scratch on the train part, save it, score it as a recommender."""
    from recalign.llm.models import tiny_model
    from recalign.llm.toy import catalog_texts, pretrain_causal_lm, template_texts, toy_corpus, word_tokenizer

    if ctx.split is None:
        raise ConfigError("a toy-lm stage needs a split (add `split:` to the recipe)")
    seed = ctx.seed if params.seed is None else params.seed
    dataset = ctx.dataset
    titles = dataset.titles()
    if len(set(titles)) < len(titles):
        raise ConfigError("toy-lm: item titles must be distinct (each title is one token)")
    tokenizer = word_tokenizer(catalog_texts(dataset) + template_texts(), titles=titles)
    train = dataset.sequences(ctx.split.history("valid"))  # the train part only: nothing of valid or test
    corpus = toy_corpus(dataset, [train[u] for u in range(dataset.n_users)], params.window, params.stride)
    texts = corpus.texts() if params.item_texts else corpus.sequences
    model, _ = tiny_model(seed=seed, hidden=params.hidden, layers=params.layers, heads=params.heads,
                          tokenizer=tokenizer)
    ctx.log(f"toy LM: vocabulary {len(tokenizer)}, {sum(p.numel() for p in model.parameters())} parameters, "
            f"{len(texts)} texts x {params.epochs} epochs")
    started = time.perf_counter()
    curve = pretrain_causal_lm(model, tokenizer, texts, epochs=params.epochs, lr=params.lr,
                               batch_size=params.batch_size, seed=seed, progress=ctx.progress)
    train_seconds = time.perf_counter() - started
    model.save_pretrained(ctx.stage_dir / "model")
    tokenizer.save_pretrained(ctx.stage_dir / "model")
    (ctx.stage_dir / "curve.json").write_text(json.dumps(curve, indent=1))
    metrics = ctx.evaluate(NextTitleScorer(model, tokenizer, titles), part="test")
    return {"model": "toy-lm", "vocabulary": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
            "texts": len(texts), "final_loss": curve[-1]["loss"], **metrics, "train_seconds": round(train_seconds, 3)}


TOY_LM_STAGE = Stage(params=ToyLMConfig, run=run_toy_lm_stage,
                     description="a tiny Llama pre-trained from scratch on the recipe's data (word-level vocabulary, "
                                 "titles as tokens); later LLM stages use it as `model: stage:<name>`")

__all__ = ["NextTitleScorer", "TOY_LM_STAGE", "run_toy_lm_stage"]
