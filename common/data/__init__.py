"""The data layer under both services: examples, tokenisation and batching, tokenizer checks, model loading."""
