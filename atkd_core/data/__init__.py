"""Data: the embedded suite, the tokenizer and the preparation of token ids and labels."""
