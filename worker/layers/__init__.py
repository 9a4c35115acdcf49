"""Building blocks of the Llama-family decoder: norms, rotary embeddings, MLP, attention."""
