"""The router service: tenants, routing, the release gate and the event stream."""
