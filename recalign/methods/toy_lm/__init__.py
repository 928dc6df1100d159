"""The toy language model: a tiny Llama pre-trained from scratch on the recipe's own data (recipe kind "toy-lm")."""
