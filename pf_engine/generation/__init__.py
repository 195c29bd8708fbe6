"""What one request's generation needs, below the runtime that runs it: the client's handle
(request.py), sampling parameters and samplers (sampling.py), logprobs (scoring.py) and
structured-output grammars (structured.py)."""
