"""Runtime: token-by-token generation and embeddings on top of transformers."""
