"""Files: checkpoints, stores, tokenizers, and the Hugging Face conversion driver."""
