"""The solver service: search strategies over an engine, within a budget."""
