"""A toy language model that can learn a toy world: a word-level tokenizer built from the catalog and the prompt
templates, and a tiny Llama pre-trained from scratch on the users' title sequences and the item texts.

Why: a random 2-layer model over SmolLM2's 49,152-token vocabulary cannot learn anything in the few steps a demo
or a test can afford, so every LLM row of the demo read 0.0000. With a vocabulary of a few hundred words and a
pre-trained start, the same stage code that fine-tunes SmolLM2 (LoRA SFT, DPO, PPO, ...) fine-tunes this model in
seconds, and its rows show what each method does. The model is saved as an ordinary Hugging Face folder
(config, weights, tokenizer with its chat template), so `load_model(folder)` loads it like any other model.

    vocabulary <- the words of titles, categories, item texts and the prompt templates (+ digits, Yes/No)
    model      <- a Llama with `layers` x `hidden`, random init (seeded), tied embeddings
    texts      <- per user, windows of the train sequence as quoted titles "A", "B", ...; per item its text
    train      <- full-parameter causal LM loss over all tokens, AdamW, linear decay, `epochs` passes
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

PAD, EOS, UNK = "<|pad|>", "<|eos|>", "<|unk|>"
ROLES = ("system", "user", "assistant")
# One line per turn: "<|role|>\ncontent\n", and the assistant turn opened for generation.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# Words every toy vocabulary has: digits and numbers for numbered lists, the validator's answers.
BASE_WORDS = [str(i) for i in range(101)] + ["Yes", "No", "yes", "no"]


def _pre_tokenizer():
    """Newlines as their own pieces, spaces kept as a leading "▁" on the next word, punctuation isolated: a text
    decodes back exactly (the Metaspace decoder turns "▁" into a space)."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), "isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Punctuation("isolated"),
    ])


def word_vocabulary(texts: Iterable[str]) -> list[str]:
    """The sorted distinct pieces of `texts` under the toy pre-tokenizer, plus each base word with and without
    its leading space."""
    split = _pre_tokenizer()
    pieces = {piece for text in texts for piece, _ in split.pre_tokenize_str(text)}
    pieces |= {w for word in BASE_WORDS for w in (word, "▁" + word)}
    pieces |= {"▁", "\n"}
    return sorted(pieces)


def word_tokenizer(texts: Iterable[str], titles: Sequence[str] = ()):
    """A `PreTrainedTokenizerFast` whose vocabulary is every word piece of `texts` (unknown words: <|unk|>),
    with pad/EOS/role tokens and the one-line-per-turn chat template; `decode(encode(t)) == t` for known words.

    Each of `titles` becomes one token (matched before words are split), so a title is one prediction, the way
    an item id is for SASRec: the toy model then learns the catalog in a few epochs instead of dozens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, EOS, UNK, *(f"<|{role}|>" for role in ROLES)]
    words = [w for w in word_vocabulary(texts) if w not in specials]
    vocab = {token: i for i, token in enumerate([*specials, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = _pre_tokenizer()
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    core.add_tokens([AddedToken(t, normalized=False) for t in dict.fromkeys(titles) if t and t not in vocab])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                        additional_special_tokens=[f"<|{role}|>" for role in ROLES],
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def template_texts() -> list[str]:
    """The fixed words of the shared prompt templates (fields removed), for the vocabulary. Only the templates of
    `recalign.llm.prompts` itself, so the vocabulary never depends on which methods happen to be imported; other
    instruction words map to <|unk|>, which costs a toy model nothing (it needs the titles, not the wording)."""
    from recalign.llm.prompts import RANKING, SEQREC, SEQREC_LIST

    out = []
    for template in (SEQREC, SEQREC_LIST, RANKING):
        for text in (template.system or "", template.user, template.answer):
            out.append(re.sub(r"\{[^}]*\}", " ", text))
    return out


def item_texts(dataset) -> list[str]:
    """Each item's text (none when the catalog has no text column)."""
    items = dataset.items
    return [str(t) for t in items["text"].fillna("")] if "text" in items.columns else []


def catalog_texts(dataset) -> list[str]:
    """Titles, quoted titles, categories and item texts of the catalog."""
    texts = [*dataset.titles(), *(f'"{t}", "{t}"' for t in dataset.titles())]
    return texts + [c for cats in dataset.item_categories() for c in cats] + item_texts(dataset)


@dataclass
class ToyCorpus:
    """The pre-training texts: title windows of the users' train sequences and one text per item."""

    sequences: list[str]
    items: list[str] = field(default_factory=list)

    def texts(self) -> list[str]:
        return self.sequences + self.items


def toy_corpus(dataset, sequences: Sequence[Sequence[int]], window: int, stride: int) -> ToyCorpus:
    """Every user's train sequence cut into windows of `window` titles (a new window every `stride` items), written
    as prompts and answers write titles: alternately quoted titles separated by ", " and a numbered list, one
    quoted title per line; plus each item's text."""
    from recalign.llm.prompts import numbered, quoted

    titles = dataset.titles()
    windows = []
    for seq in sequences:
        seq = list(seq)
        starts = range(0, max(1, len(seq) - window + 1), stride) if len(seq) > window else [0]
        for start in starts:
            names = [titles[i] for i in seq[start:start + window]]
            # every other window as a numbered list: the two ways prompts and answers write titles
            windows.append(numbered(names) if len(windows) % 2 else quoted(names))
    return ToyCorpus(windows, item_texts(dataset))


def pretrain_causal_lm(model, tokenizer, texts: Sequence[str], *, epochs: int, lr: float, batch_size: int,
                       seed: int, progress: bool = False, description: str = "toy LM") -> list[dict]:
    """Full-parameter causal-LM training of `model` on `texts` (loss on every non-pad token, EOS appended),
    AdamW with a linear decay to zero; batches are seeded shuffles, each padded to its longest text.
    Returns one curve row per epoch (epoch, loss)."""
    from recalign.training import epoch_progress

    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    steps_per_epoch = math.ceil(len(ids) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
    rng = np.random.default_rng(seed)
    pad = tokenizer.pad_token_id
    model.train()
    curve = []
    with epoch_progress(epochs, description, progress) as advance:
        for epoch in range(1, epochs + 1):
            order = rng.permutation(len(ids))
            losses = []
            for start in range(0, len(order), batch_size):
                batch = [ids[i] for i in order[start:start + batch_size]]
                width = max(len(x) for x in batch)
                input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch])
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch])
                labels = input_ids.masked_fill(mask == 0, -100)
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
            curve.append({"epoch": epoch, "loss": round(float(np.mean(losses)), 5)})
            advance(loss=curve[-1]["loss"])
    model.eval()
    return curve


__all__ = ["CHAT_TEMPLATE", "ToyCorpus", "catalog_texts", "item_texts", "pretrain_causal_lm", "template_texts", "toy_corpus",
           "word_tokenizer", "word_vocabulary"]
