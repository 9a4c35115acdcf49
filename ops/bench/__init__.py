"""`pagedctl bench`: a load generator and report for paged's OpenAI-compatible HTTP API."""
