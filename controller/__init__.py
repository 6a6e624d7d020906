"""Controller: HTTP API, functions, activations, scheduler, autoscaler (see DESIGN.md)."""
