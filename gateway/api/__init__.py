"""The OpenAI-compatible HTTP API: request decoding, validation, detokenization, SSE, metrics."""
