"""Per-tenant policy: YAML files with CEL expressions, compiled, tested and hot-reloaded."""
