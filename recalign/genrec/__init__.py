"""RecGPT blocks: item text embeddings, the FSQ item tokenizer, the code decoder and trie-constrained beam search."""
