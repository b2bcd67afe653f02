"""The verifier service: exact checkers and the evidence contract."""
