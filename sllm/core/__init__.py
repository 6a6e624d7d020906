"""What the controller and the invoker share: wire messages, errors, configuration."""
